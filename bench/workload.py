"""Realistic telemetry events for benchmarks and the demo, from a seeded generator.

The shape follows what Sourcegraph instances export (see shared/protocol/GATEWAY.md):
mostly Cody and search events, numeric metadata on every event, private_metadata on
some (allowlisted types and others, with a few non-string values), feature flags,
interaction ids, and marketing tracking on the events of web clients.

Two scenarios: `raw` (an exporter that redacts nothing: the guard removes a lot) and
`redacted` (what a Sourcegraph instance sends after its own in-instance redaction: no
marketing tracking, private_metadata only with keys its allowlist names; the guard
verifies and removes nothing).
"""

from __future__ import annotations

import random
import uuid

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# (feature, action, weight, private_metadata keys the callsite sends); the keys that
# Sourcegraph's allowlist lets through are listed in REDACTED_KEYS.
EVENT_TYPES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("cody.completion", "suggested", 30, ("languageId", "otherCompletionProviders", "triggerKind")),
    ("cody.completion", "accepted", 10, ("languageId", "otherCompletionProviders")),
    ("cody.chatResponse", "submitted", 8, ("chatModel", "promptText")),
    ("cody.chat-question", "submitted", 6, ("chatModel", "requestID")),
    ("cody.command.edit", "executed", 3, ("model", "instruction")),
    ("cody.hoverCommands", "visible", 4, ("languageId",)),
    ("blob.codeintel", "hover", 8, ("languageId", "repositoryName")),
    ("search.results", "viewed", 12, ("query",)),
    ("repo.page", "viewed", 8, ()),
    ("cody.auth", "login", 3, ("authProvider",)),
    ("extension.settings", "changed", 4, ("setting", "value")),
    ("notebook", "created", 2, ()),
    ("batchChange", "applied", 2, ("changesetCount",)),
)
REDACTED_KEYS = {
    "cody.completion": {"languageId", "otherCompletionProviders"},
    "cody.chatResponse": {"chatModel"},
    "cody.chat-question": {"chatModel"},
    "cody.command.edit": {"model"},
    "cody.hoverCommands": {"languageId"},
    "blob.codeintel": {"languageId"},
}
_WEIGHTS = [w for _, _, w, _ in EVENT_TYPES]
_CLIENTS = (("VSCODE_CODY_EXTENSION", "1.48.0"), ("JETBRAINS_CODY", "7.2.1"), ("WEB", "6.4.0"))
_FLAGS = tuple(f"feature-flag-{i}" for i in range(24))


def event(rng: random.Random, redacted: bool = False) -> pb.Event:
    """One event of the mix: every field the seed defines can appear, with realistic frequency."""
    feature, action, _, private_keys = rng.choices(EVENT_TYPES, weights=_WEIGHTS)[0]
    if redacted:
        private_keys = tuple(k for k in private_keys if k in REDACTED_KEYS.get(feature, ()))
    ev = pb.Event(id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), feature=feature, action=action)
    ev.timestamp.FromSeconds(1_760_000_000 + rng.randrange(10_000_000))
    ev.source.server.version = "6.4.2871"
    client, version = rng.choice(_CLIENTS)
    ev.source.client.name = client
    ev.source.client.version = version
    params = ev.parameters
    params.version = rng.randrange(3)
    for name in rng.sample(("durationMs", "charCount", "lineCount", "contextItems", "latencyMs", "tokens"), 4):
        params.metadata[name] = round(rng.random() * 1000, 2)
    if private_keys and rng.random() < 0.6:
        for key in private_keys:
            if key in ("changesetCount",):
                params.private_metadata[key] = rng.randrange(50)
            else:
                params.private_metadata[key] = f"{key}-{rng.randrange(1000)}"
    if rng.random() < 0.05:
        params.legacy_metadata["legacyCount"] = rng.randrange(100)
    if rng.random() < 0.2:
        params.billing_metadata.product = "cody"
        params.billing_metadata.category = "core"
    if rng.random() < 0.9:
        ev.user.user_id = rng.randrange(1, 5000)
        ev.user.anonymous_user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if rng.random() < 0.7:
        for flag in rng.sample(_FLAGS, rng.randrange(4, 12)):
            ev.feature_flags.flags[flag] = rng.choice(("true", "false"))
    if rng.random() < 0.6:
        ev.interaction.trace_id = f"{rng.getrandbits(128):032x}"
        ev.interaction.interaction_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if client == "WEB" and not redacted:
        mt = ev.marketing_tracking
        mt.url = f"https://sourcegraph.example.com/search?q=repo%3Aacme%2Fapi+{rng.randrange(1000)}"
        mt.referrer = "https://www.google.com/"
        mt.first_page_seen_url = "https://sourcegraph.example.com/"
        mt.utm_source = "newsletter"
        mt.utm_campaign = "launch"
    return ev


def events(count: int, seed: int = 7, redacted: bool = False) -> list[pb.Event]:
    rng = random.Random(seed)
    return [event(rng, redacted) for _ in range(count)]


def batch(count: int, seed: int = 7, redacted: bool = False) -> pb.RecordEventsRequest:
    request = pb.RecordEventsRequest()
    request.events.events.extend(events(count, seed, redacted))
    return request
