"""The audit trail: one JSON record per request message on `telemetry_guard.audit`, key names
only at DEBUG, and never a removed value in any log record or error message."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_harness import (
    BEARER,
    CASES,
    SECRET_VALUES,
    TIMEOUT,
    TOKEN,
    Call,
    dropped_event,
    event,
    events_request,
    exercise,
    load_test_policy,
    metadata_request,
    publish_metadata_request,
    record_event_request,
    sensitive_event,
    serve_aio,
    serve_sync,
    users_request,
    with_unknown_field,
)

from telemetry_guard.interceptors import (
    AUDIT_LOGGER_NAME,
    AsyncGuardServerInterceptor,
    GuardServerInterceptor,
    wrap_channel,
)
from telemetry_guard.interceptors.audit import identity
from telemetry_guard.policy import Engine
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

STACKS = ("sync", "aio")
SIDES = ("server", "client")
RECORD_EVENTS_PATH = "/telemetrygateway.v1.TelemeteryGatewayService/RecordEvents"

STREAM = Call(
    "RecordEvents",
    [
        metadata_request("licensed_instance", request_id="req-audit"),
        events_request(sensitive_event("a1"), dropped_event("a2")),
        events_request(event("a3")),
    ],
)


def audit_records(caplog: pytest.LogCaptureFixture, audit: str = "decision") -> list[dict[str, Any]]:
    out = []
    for record in caplog.records:
        if record.name != AUDIT_LOGGER_NAME:
            continue
        data = json.loads(record.getMessage())
        assert data == record.telemetry_guard  # type: ignore[attr-defined]  # the same dict, for handlers
        if data["audit"] == audit:
            out.append(data | {"level": record.levelname})
    return out


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("stack", STACKS)
def test_one_json_record_per_request_message(stack: str, side: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    (result,), _ = exercise(stack, side, [STREAM])
    assert result.code == grpc.StatusCode.OK
    records = audit_records(caplog)
    assert [r["message"] for r in records] == [0, 1, 2]
    for record in records:
        assert record["level"] == "INFO"
        assert record["side"] == side and record["rpc"] == "RecordEvents"
        assert record["kind"] == "licensed_instance" and record["instance_id"] == "inst-licensed"
        assert record["request_id"] == "req-audit"
        assert "license_key" not in json.dumps(record) and "lic-key" not in json.dumps(record)
    metadata, first, second = records
    assert (metadata["events_in"], metadata["removed_per_rule"]) == (0, {})
    assert first["events_in"] == 2 and first["events_out"] == 1
    assert first["dropped_event_ids"] == ["a2"]
    assert first["removed_per_rule"] == {
        "defaults.events.exclude": 1,
        "defaults.marketing_tracking": 1,
        "defaults.private_metadata": 1,
        "defaults.private_metadata.non_string": 1,
    }
    assert (second["dropped_event_ids"], second["removed_per_rule"]) == ([], {})


def test_key_names_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    exercise("sync", "server", [STREAM])
    assert audit_records(caplog, "removed_keys") == []
    assert not any("prompt" in r.getMessage() or "otherCompletionProviders" in r.getMessage() for r in caplog.records)

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER_NAME)
    exercise("sync", "server", [STREAM])
    (detail,) = audit_records(caplog, "removed_keys")
    assert detail["level"] == "DEBUG" and detail["message"] == 1 and detail["request_id"] == "req-audit"
    (removed,) = detail["events"]
    assert removed["id"] == "a1"
    keys = {r["rule"]: r["keys"] for r in removed["removals"]}
    assert keys["defaults.private_metadata"] == ["prompt"]
    assert keys["defaults.private_metadata.non_string"] == ["otherCompletionProviders"]
    assert len(audit_records(caplog)) == 3  # still one decision record per message


@pytest.mark.parametrize("stack", STACKS)
def test_refusals_are_recorded_as_warnings(stack: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    calls = [
        Call("RecordEvents", [metadata_request("managed_service", request_id="req-x"), events_request(event("x1"))]),
        Call("RecordEvent", [record_event_request("licensed_instance", event("x2"), request_id="req-y")]),
    ]
    exercise(stack, "server", calls)
    unauthenticated, unsupported = audit_records(caplog)
    assert unauthenticated["level"] == "WARNING"
    assert unauthenticated["refused"]["code"] == "UNAUTHENTICATED"
    assert unauthenticated["refused"]["rule"] == "credentials.required_for"
    assert (unauthenticated["kind"], unauthenticated["service_id"], unauthenticated["request_id"]) == (
        "managed_service",
        "svc-1",
        "req-x",
    )
    # The caller got the gateway's own words; the audit record says why, with the RPC and the kind.
    assert unsupported["refused"]["code"] == "UNIMPLEMENTED" and unsupported["request_id"] == "req-y"
    assert unsupported["refused"]["rule"] == "identifier"
    assert unsupported["refused"]["message"] == "unsupported identifier type"
    assert "RecordEvent" in unsupported["refused"]["reason"] and "licensed_instance" in unsupported["refused"]["reason"]


def test_identity_names_the_publisher_never_the_license_key() -> None:
    licensed = pb.Identifier()
    licensed.licensed_instance.license_key = "lic-key"
    licensed.licensed_instance.instance_id = "inst"
    service = pb.Identifier()
    service.managed_service.service_id = "svc"
    service.managed_service.service_environment = "prod"
    workspace = pb.Identifier()
    workspace.workspace.workspace_id = "ws"
    assert identity(licensed) == {"instance_id": "inst"}
    assert identity(service) == {"service_id": "svc", "service_environment": "prod"}
    assert identity(workspace) == {"workspace_id": "ws"}
    assert identity(None) == identity(pb.Identifier()) == {}


# -- the promise: no removed value in any log record or error message ---------------------------


class LeakyEngine(Engine):
    """Fails with a message that quotes data, as a careless engine bug would."""

    def record_events(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"cannot handle {SECRET_VALUES[0]}")


def _raw_calls(target: str, guarded: bool) -> list[Any]:
    """Unknown fields (a secret in field 99) through a raw-bytes method."""
    requests = [
        with_unknown_field(metadata_request("licensed_instance")),
        with_unknown_field(events_request(sensitive_event("u1"))),
    ]
    with grpc.insecure_channel(target) as raw:
        channel = wrap_channel(raw, load_test_policy()) if guarded else raw
        return list(channel.stream_stream(RECORD_EVENTS_PATH)(iter(requests), timeout=TIMEOUT))


def test_no_removed_value_in_any_log_record_or_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, grpc's own included
    details: list[str] = []
    for stack in STACKS:
        for side in SIDES:
            results, _ = exercise(stack, side, [case.call for case in CASES])
            details += [r.details for r in results]
            broken, _ = exercise(stack, side, [STREAM], policy=LeakyEngine(load_test_policy()))
            assert broken[0].code == grpc.StatusCode.INTERNAL
            details += [r.details for r in broken]
    extra = [
        Call("RecordEvents", [metadata_request("workspace"), events_request(sensitive_event("w1"))], BEARER),
        Call("RecordEvent", [record_event_request("managed_service", sensitive_event("w2"))], BEARER),
        Call("PublishInstanceUserMetadata", [publish_metadata_request("unlicensed_instance"), users_request()]),
    ]
    details += [r.details for r in exercise("aio", "server", extra, client="aio")[0]]
    with serve_sync([GuardServerInterceptor(load_test_policy())]) as served:
        _raw_calls(served.target, guarded=False)
    with serve_sync() as served:
        _raw_calls(served.target, guarded=True)

    async def aio_raw() -> None:
        async with serve_aio([AsyncGuardServerInterceptor(load_test_policy())]) as served:
            await asyncio.to_thread(_raw_calls, served.target, False)

    asyncio.run(aio_raw())

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = [formatter.format(record) for record in caplog.records]
    texts += [json.dumps(getattr(r, "telemetry_guard", {})) for r in caplog.records]
    assert any("removed_keys" in t for t in texts), "DEBUG records were written"
    assert any("could not be evaluated" in d for d in details), "refusals were produced"
    for text in texts + details:
        for secret in (*SECRET_VALUES, TOKEN):
            assert secret not in text, (secret, text[:300])
