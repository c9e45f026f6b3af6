"""Checking the bearer token of kinds that must present credentials, as the gateway checks it.

The engine already refuses a call of such a kind that has no `authorization: Bearer <token>`
(UNAUTHENTICATED). A verifier decides whether a present token is good enough:

- BearerPresent (the default): any token; the gateway verifies it again (nothing about the
  token, its activity or its scope, is verified here).
- TokenIntrospection: OAuth 2.0 token introspection (RFC 7662) against a configured
  endpoint (Sourcegraph Accounts, SAMS), with the standard library only. The token must be
  active and carry a scope that covers one of the policy's scopes, matched as the SAMS SDK
  matches them (policy/scopes.py; telemetry_gateway::events::write by default).

Answers are the gateway's: an endpoint that cannot be reached or does not answer usably is
INTERNAL "unable to validate token" (CANCELLED when the call was cancelled meanwhile: never
allow); an inactive token or one without the scope is PERMISSION_DENIED "permission denied".
The reason goes to the audit log only (GuardError.reason), never to the caller. Answers are
cached in bounded TTL caches, a rejection only briefly.

A verifier refuses by raising GuardError. Neither its message nor its reason contains the token.
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
from telemetry_guard.policy import scopes as sams

RULE_INTROSPECTION = "credentials.introspection"
RULE_SCOPE = "credentials.scope"
RULE_REQUIRED = "credentials.required_for"

# The gateway's answers (GATEWAY.md): exporters see these and nothing more.
PERMISSION_DENIED = "permission denied"
UNABLE_TO_VALIDATE = "unable to validate token"


_Refusal = tuple[grpc.StatusCode, str, str]  # code, rule, reason (without the RPC)


def _refuse(rpc: str, refusal: _Refusal) -> GuardError:
    code, rule, reason = refusal
    return GuardError(code, rule, PERMISSION_DENIED, f"{rpc}: {reason} (rule {rule})")


def cancelled(reason: str) -> GuardError:
    """A call cancelled while its token was being validated: CANCELLED, as the gateway answers it."""
    return GuardError(
        grpc.StatusCode.CANCELLED, RULE_INTROSPECTION, UNABLE_TO_VALIDATE, f"{reason}; the call was cancelled"
    )


class CredentialVerifier(ABC):
    """Decides whether a bearer token may publish. Raise GuardError to refuse.

    scopes: the policy's credentials.scope, one or more; a token that covers any one of them suffices.
    """

    @abstractmethod
    def verify(self, token: str, scopes: tuple[str, ...], rpc: str) -> None:
        """Refuse (raise GuardError) or return. May block: called directly by sync interceptors."""

    async def verify_async(self, token: str, scopes: tuple[str, ...], rpc: str) -> None:
        """The aio form. The default calls verify(): right for verifiers that never block."""
        self.verify(token, scopes, rpc)


class BearerPresent(CredentialVerifier):
    """A token must be there; its worth (activity, scope) is left to the gateway (the default)."""

    def verify(self, token: str, scopes: tuple[str, ...], rpc: str) -> None:
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
    """RFC 7662 introspection: POST token=<token> to `url`, require active + a scope covering one required.

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

    def verify(self, token: str, scopes: tuple[str, ...], rpc: str) -> None:
        key = self._key(token, scopes)
        if self._cached(key, rpc):
            return
        answer = self._introspect(token, rpc)
        self._decide(key, answer, scopes, rpc)

    async def verify_async(self, token: str, scopes: tuple[str, ...], rpc: str) -> None:
        if self._cached(self._key(token, scopes), rpc):  # no thread for a cache hit
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self.verify, token, scopes, rpc)

    # -- cache --------------------------------------------------------------------------

    @staticmethod
    def _key(token: str, scopes: tuple[str, ...]) -> bytes:
        return hashlib.sha256("\0".join((*scopes, token)).encode()).digest()

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
            grpc.StatusCode.INTERNAL,
            RULE_INTROSPECTION,
            UNABLE_TO_VALIDATE,
            f"{rpc}: token introspection {why}; the call is refused (rule {RULE_INTROSPECTION})",
        )

    def _decide(self, key: bytes, answer: dict[str, Any], scopes: tuple[str, ...], rpc: str) -> None:
        exp = answer.get("exp")
        expires = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        scope_text = answer.get("scope")
        granted = scope_text.split() if isinstance(scope_text, str) else []
        refusal: _Refusal
        if answer.get("active") is not True or (expires is not None and expires <= time.time()):
            refusal = (grpc.StatusCode.PERMISSION_DENIED, RULE_INTROSPECTION, "bearer token is not active")
        elif not sams.satisfied(granted, scopes):
            wanted = " or ".join(scopes)
            refusal = (grpc.StatusCode.PERMISSION_DENIED, RULE_SCOPE, f"bearer token has no scope covering {wanted}")
        else:
            with self._lock:
                self._accepted[key] = float("inf") if expires is None else expires
            return
        with self._lock:
            self._rejected[key] = refusal
        raise _refuse(rpc, refusal)
