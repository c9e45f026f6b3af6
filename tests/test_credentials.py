"""Credential verifiers: bearer-present, and OAuth 2.0 token introspection (RFC 7662) against a
real tiny HTTP server on 127.0.0.1, alone and behind the interceptors of both stacks."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from grpc_harness import (
    DENIED,
    OK,
    UNAUTHENTICATED,
    Call,
    event,
    events_request,
    exercise,
    metadata_request,
    record_event_request,
)

from telemetry_guard.interceptors import BearerPresent, GuardError, TokenIntrospection

SCOPE = "telemetry_gateway::events::write"
SCOPES = (SCOPE,)
INTERNAL = grpc.StatusCode.INTERNAL  # the gateway's answer when a token cannot be validated


def _answers() -> dict[str, Any]:
    now = time.time()
    return {
        "tok-good": {"active": True, "scope": f"openid {SCOPE}", "exp": now + 3600},
        "tok-noexp": {"active": True, "scope": SCOPE},
        "tok-noscope": {"active": True, "scope": "openid telemetry_gateway::events::read telemetry_gateway::ev::write"},
        "tok-inactive": {"active": False},
        "tok-truthy": {"active": "true", "scope": SCOPE},  # not the JSON true: refused
        "tok-expired": {"active": True, "scope": SCOPE, "exp": now - 10},
        "tok-array": [1, 2],
    }


@dataclass
class Endpoint:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, Any] = field(default_factory=_answers)
    fail_first: set[str] = field(default_factory=set)  # tokens answered 500 once

    def tokens(self) -> list[str]:
        return [r["token"] for r in self.requests]


@contextmanager
def introspection_endpoint() -> Iterator[Endpoint]:
    """RFC 7662 endpoint: POST form token=...; special tokens misbehave on purpose."""
    endpoint = Endpoint("")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            token = form.get("token", [""])[0]
            endpoint.requests.append(
                {"path": self.path, "token": token, "form": form, "authorization": self.headers.get("Authorization")}
            )
            if self.path == "/elsewhere":
                return self._send(200, json.dumps({"active": True, "scope": SCOPE}).encode())
            if token in endpoint.fail_first:
                endpoint.fail_first.discard(token)
                return self._send(500, b"{}")
            if token == "tok-500":
                return self._send(500, b"oops")
            if token == "tok-badjson":
                return self._send(200, b"not json")
            if token == "tok-slow":
                time.sleep(0.5)
            if token == "tok-redirect":
                self.send_response(302)
                self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._send(200, json.dumps(endpoint.answers.get(token, {"active": False})).encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/oauth/introspect"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/introspect"


def refusal(verifier: TokenIntrospection, token: str) -> GuardError | None:
    try:
        verifier.verify(token, SCOPES, "RecordEvents")
    except GuardError as exc:
        return exc
    return None


# -- the verifier alone --------------------------------------------------------------------

VERDICTS = [
    ("tok-good", None, ""),
    ("tok-noexp", None, ""),
    ("tok-noscope", DENIED, "credentials.scope"),
    ("tok-inactive", DENIED, "credentials.introspection"),
    ("tok-truthy", DENIED, "credentials.introspection"),
    ("tok-expired", DENIED, "credentials.introspection"),
    ("tok-unknown", DENIED, "credentials.introspection"),
    ("tok-500", INTERNAL, "credentials.introspection"),
    ("tok-badjson", INTERNAL, "credentials.introspection"),
    ("tok-array", INTERNAL, "credentials.introspection"),
    ("tok-redirect", INTERNAL, "credentials.introspection"),
]


@pytest.mark.parametrize(("token", "code", "rule"), VERDICTS, ids=[v[0] for v in VERDICTS])
def test_introspection_verdicts(token: str, code: grpc.StatusCode | None, rule: str) -> None:
    with introspection_endpoint() as endpoint:
        error = refusal(TokenIntrospection(endpoint.url), token)
    if code is None:
        assert error is None
        return
    assert error is not None
    assert (error.code, error.rule) == (code, rule)
    # The caller gets the gateway's words; the RPC and the rule go to the audit log (the reason).
    assert error.message == ("permission denied" if code == DENIED else "unable to validate token")
    assert "RecordEvents" in error.reason and rule in error.reason
    assert token not in error.message and token not in str(error) and token not in error.reason
    assert endpoint.tokens()[0] == token


def test_redirect_is_not_followed() -> None:
    with introspection_endpoint() as endpoint:
        assert refusal(TokenIntrospection(endpoint.url), "tok-redirect") is not None
    assert [r["path"] for r in endpoint.requests] == ["/oauth/introspect"]


def test_unreachable_endpoint_is_internal_never_allowed() -> None:
    verifier = TokenIntrospection(closed_port_url(), timeout=2)
    for _ in range(2):
        error = refusal(verifier, "tok-good")
        assert error is not None and error.code == INTERNAL


def test_slow_endpoint_times_out_as_internal() -> None:
    with introspection_endpoint() as endpoint:
        error = refusal(TokenIntrospection(endpoint.url, timeout=0.1), "tok-slow")
    assert error is not None and error.code == INTERNAL


def test_request_follows_rfc7662_with_client_credentials() -> None:
    with introspection_endpoint() as endpoint:
        verifier = TokenIntrospection(endpoint.url, client_id="guard", client_secret="s3:cret")
        assert refusal(verifier, "tok-good") is None
    (request,) = endpoint.requests
    assert request["form"] == {"token": ["tok-good"], "token_type_hint": ["access_token"]}
    scheme, _, encoded = request["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "guard:s3%3Acret"  # RFC 6749 2.3.1: form-encoded


def test_answers_are_cached_and_rejections_only_briefly() -> None:
    with introspection_endpoint() as endpoint:
        verifier = TokenIntrospection(endpoint.url, ttl=60, rejection_ttl=0.2)
        for _ in range(3):
            assert refusal(verifier, "tok-good") is None
            assert refusal(verifier, "tok-inactive") is not None
        assert endpoint.tokens() == ["tok-good", "tok-inactive"]
        time.sleep(0.3)
        assert refusal(verifier, "tok-inactive") is not None
        assert refusal(verifier, "tok-good") is None
        assert endpoint.tokens() == ["tok-good", "tok-inactive", "tok-inactive"]


def test_cached_token_is_not_trusted_past_its_exp() -> None:
    with introspection_endpoint() as endpoint:
        endpoint.answers["tok-short"] = {"active": True, "scope": SCOPE, "exp": time.time() + 0.2}
        verifier = TokenIntrospection(endpoint.url, ttl=60)
        assert refusal(verifier, "tok-short") is None
        assert refusal(verifier, "tok-short") is None
        time.sleep(0.3)
        error = refusal(verifier, "tok-short")  # introspected again: now expired
    assert error is not None and error.code == DENIED
    assert endpoint.tokens() == ["tok-short", "tok-short"]


def test_unavailable_is_never_cached() -> None:
    with introspection_endpoint() as endpoint:
        endpoint.fail_first.add("tok-good")
        verifier = TokenIntrospection(endpoint.url)
        first = refusal(verifier, "tok-good")
        assert first is not None and first.code == INTERNAL
        assert refusal(verifier, "tok-good") is None
    assert endpoint.tokens() == ["tok-good", "tok-good"]


def test_cache_is_bounded_and_keyed_by_scope() -> None:
    with introspection_endpoint() as endpoint:
        verifier = TokenIntrospection(endpoint.url, cache_size=2)
        for name in ("a", "b", "c"):
            endpoint.answers[f"tok-{name}"] = {"active": True, "scope": SCOPE}
            assert refusal(verifier, f"tok-{name}") is None
        assert verifier._accepted.maxsize == 2 and len(verifier._accepted) <= 2
        with pytest.raises(GuardError) as raised:
            verifier.verify("tok-a", ("another::scope::write",), "RecordEvent")
    assert raised.value.rule == "credentials.scope"


def test_verify_async_runs_in_the_executor_and_not_for_a_cache_hit() -> None:
    submitted: list[Any] = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    with introspection_endpoint() as endpoint, Counting(max_workers=1) as executor:
        verifier = TokenIntrospection(endpoint.url, executor=executor)

        async def run() -> None:
            await verifier.verify_async("tok-good", SCOPES, "RecordEvents")
            await verifier.verify_async("tok-good", SCOPES, "RecordEvents")
            with pytest.raises(GuardError):
                await verifier.verify_async("tok-inactive", SCOPES, "RecordEvents")

        asyncio.run(run())
    assert len(submitted) == 2


def test_only_http_endpoints() -> None:
    with pytest.raises(ValueError, match="http"):
        TokenIntrospection("file:///etc/passwd")
    with pytest.raises(ValueError, match="not both"):
        TokenIntrospection("https://x.invalid/i", client_id="a", authorization="Bearer b")


def test_bearer_present_is_the_default_and_only_wants_a_token() -> None:
    BearerPresent().verify("anything", SCOPES, "RecordEvent")
    with pytest.raises(GuardError) as raised:
        BearerPresent().verify("", SCOPES, "RecordEvent")
    assert raised.value.code == UNAUTHENTICATED


# -- behind the interceptors -------------------------------------------------------------------

STACKS = ("sync", "aio")
SIDES = ("server", "client")


def _calls(token: str) -> list[Call]:
    auth = (("authorization", f"Bearer {token}"),)
    return [
        Call("RecordEvents", [metadata_request("managed_service"), events_request(event("e1"))], auth),
        Call("RecordEvent", [record_event_request("managed_service", event("e2"))], auth),
    ]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize(
    ("token", "code"),
    [("tok-good", OK), ("tok-inactive", DENIED), ("tok-noscope", DENIED), ("tok-500", INTERNAL)],
)
def test_introspection_behind_the_interceptors(stack: str, side: str, token: str, code: grpc.StatusCode) -> None:
    with introspection_endpoint() as endpoint:
        results, recorder = exercise(stack, side, _calls(token), verifier=TokenIntrospection(endpoint.url))
    assert [r.code for r in results] == [code, code]
    if code == OK:
        assert [c.rpc for c in recorder.calls] == ["RecordEvents", "RecordEvent"]
        assert endpoint.tokens() == [token]  # the second call was answered from the cache
    else:
        assert recorder.calls == []
        assert all(token not in r.details for r in results)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("stack", STACKS)
def test_unreachable_introspection_behind_the_interceptors(stack: str, side: str) -> None:
    verifier = TokenIntrospection(closed_port_url(), timeout=2)
    results, recorder = exercise(stack, side, _calls("tok-good"), verifier=verifier)
    assert [r.code for r in results] == [INTERNAL, INTERNAL]
    assert all(r.details == "unable to validate token" for r in results)
    assert recorder.calls == []


@pytest.mark.parametrize("stack", STACKS)
def test_kinds_without_credentials_never_reach_the_verifier(stack: str) -> None:
    call = Call("RecordEvents", [metadata_request("licensed_instance"), events_request(event("e3"))])
    with introspection_endpoint() as endpoint:
        (result,), _ = exercise(stack, "server", [call], verifier=TokenIntrospection(endpoint.url))
    assert result.code == OK
    assert endpoint.requests == []
