"""Checking the bearer token of kinds that must present credentials.

The engine already refuses a call of such a kind that has no `authorization: Bearer <token>`
(UNAUTHENTICATED). A verifier decides whether a present token is good enough:

- BearerPresent (the default): any token; the gateway verifies it again.
- TokenIntrospection: OAuth 2.0 token introspection (RFC 7662) against a configured
  endpoint, with the standard library only. The token must be active and carry the
  policy's scope (telemetry_gateway::events::publish by default). Answers are cached in
  bounded TTL caches, a rejection only briefly. An endpoint that cannot be reached or does
  not answer usably refuses the call with UNAVAILABLE: never allow.

A verifier refuses by raising GuardError. Its messages never contain the token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from typing import Any

import grpc
from cachetools import TTLCache

from telemetry_guard.interceptors.errors import GuardError

RULE_INTROSPECTION = "credentials.introspection"
RULE_SCOPE = "credentials.scope"
RULE_REQUIRED = "credentials.required_for"


_Refusal = tuple[grpc.StatusCode, str, str]  # code, rule, reason (without the RPC)


def _refuse(rpc: str, refusal: _Refusal) -> GuardError:
    code, rule, reason = refusal
    return GuardError(code, rule, f"{rpc}: {reason} (rule {rule})")


class CredentialVerifier(ABC):
    """Decides whether a bearer token may publish. Raise GuardError to refuse."""

    @abstractmethod
    def verify(self, token: str, scope: str, rpc: str) -> None:
        """Refuse (raise GuardError) or return. May block: called directly by sync interceptors."""

    async def verify_async(self, token: str, scope: str, rpc: str) -> None:
        """The aio form. The default calls verify(): right for verifiers that never block."""
        self.verify(token, scope, rpc)


class BearerPresent(CredentialVerifier):
    """A token must be there; its worth is left to the gateway (the default)."""

    def verify(self, token: str, scope: str, rpc: str) -> None:
        if not token:
            raise GuardError(
                grpc.StatusCode.UNAUTHENTICATED,
                RULE_REQUIRED,
                f"{rpc}: 'authorization: Bearer <token>' is required (rule {RULE_REQUIRED})",
            )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would send the token somewhere else (or drop it silently): refuse it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class TokenIntrospection(CredentialVerifier):
    """RFC 7662 introspection: POST token=<token> to `url`, require active + scope.

    client_id/client_secret: HTTP Basic credentials of this resource server at the endpoint
    (RFC 7662 section 2.1), or `authorization`: a complete Authorization header value.
    ttl bounds how long an accepted token is trusted (never past its `exp`);
    rejection_ttl how long a refusal is remembered. Both caches hold at most cache_size tokens,
    keyed by a SHA-256 of the token. executor: where verify_async runs the blocking request
    (None: the event loop's default executor).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        authorization: str | None = None,
        timeout: float = 5.0,
        cache_size: int = 1024,
        ttl: float = 300.0,
        rejection_ttl: float = 5.0,
        executor: Executor | None = None,
    ) -> None:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"introspection url must be http or https, not {scheme or 'empty'!r}")
        if client_id is not None and authorization is not None:
            raise ValueError("give client_id/client_secret or authorization, not both")
        if client_id is not None:
            basic = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret or '', safe='')}"
            authorization = "Basic " + base64.b64encode(basic.encode("utf-8")).decode("ascii")
        self.url = url
        self.timeout = timeout
        self._authorization = authorization
        self._accepted: TTLCache[bytes, float] = TTLCache(maxsize=cache_size, ttl=ttl)  # -> trusted until
        self._rejected: TTLCache[bytes, _Refusal] = TTLCache(maxsize=cache_size, ttl=rejection_ttl)
        self._lock = threading.Lock()
        self._executor = executor
        self._opener = urllib.request.build_opener(_NoRedirect())

    # -- the interface ------------------------------------------------------------------

    def verify(self, token: str, scope: str, rpc: str) -> None:
        key = self._key(token, scope)
        if self._cached(key, rpc):
            return
        answer = self._introspect(token, rpc)
        self._decide(key, answer, scope, rpc)

    async def verify_async(self, token: str, scope: str, rpc: str) -> None:
        if self._cached(self._key(token, scope), rpc):  # no thread for a cache hit
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self.verify, token, scope, rpc)

    # -- cache --------------------------------------------------------------------------

    @staticmethod
    def _key(token: str, scope: str) -> bytes:
        return hashlib.sha256(f"{scope}\0{token}".encode()).digest()

    def _cached(self, key: bytes, rpc: str) -> bool:
        """True for a trusted token; raises a remembered refusal; False when unknown."""
        with self._lock:
            until = self._accepted.get(key)
            if until is not None:
                if until > time.time():
                    return True
                del self._accepted[key]
            refusal = self._rejected.get(key)
        if refusal is not None:
            raise _refuse(rpc, refusal)
        return False

    # -- the endpoint -------------------------------------------------------------------

    def _introspect(self, token: str, rpc: str) -> dict[str, Any]:
        body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        request = urllib.request.Request(self.url, data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        request.add_header("Accept", "application/json")
        if self._authorization:
            request.add_header("Authorization", self._authorization)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                if response.status != 200:
                    raise self._unavailable(rpc, f"answered HTTP {response.status}")
                answer = json.loads(response.read(1 << 20))
        except GuardError:
            raise
        except urllib.error.HTTPError as exc:
            raise self._unavailable(rpc, f"answered HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad JSON
            raise self._unavailable(rpc, f"could not be used ({type(exc).__name__})") from None
        if not isinstance(answer, dict):
            raise self._unavailable(rpc, "did not answer with a JSON object")
        return answer

    @staticmethod
    def _unavailable(rpc: str, why: str) -> GuardError:
        return GuardError(
            grpc.StatusCode.UNAVAILABLE,
            RULE_INTROSPECTION,
            f"{rpc}: token introspection {why}; the call is refused (rule {RULE_INTROSPECTION})",
        )

    def _decide(self, key: bytes, answer: dict[str, Any], scope: str, rpc: str) -> None:
        exp = answer.get("exp")
        expires = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        scopes = answer.get("scope")
        granted = scopes.split() if isinstance(scopes, str) else []
        refusal: _Refusal
        if answer.get("active") is not True or (expires is not None and expires <= time.time()):
            refusal = (grpc.StatusCode.PERMISSION_DENIED, RULE_INTROSPECTION, "bearer token is not active")
        elif scope not in granted:
            refusal = (grpc.StatusCode.PERMISSION_DENIED, RULE_SCOPE, f"bearer token lacks scope {scope}")
        else:
            with self._lock:
                self._accepted[key] = float("inf") if expires is None else expires
            return
        with self._lock:
            self._rejected[key] = refusal
        raise _refuse(rpc, refusal)
