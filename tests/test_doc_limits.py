"""Every limit the README and docs state is the constant the code enforces.

A number written for people drifts when the code changes; each is read out of the prose
here and compared with the constant (the policy file limit once said 4 MiB where the code
refused files over 2 MiB).
"""

from __future__ import annotations

import re
from pathlib import Path

from telemetry_guard.commands.serve import MAX_MESSAGE_BYTES_LIMIT
from telemetry_guard.interceptors.credentials import TokenIntrospection
from telemetry_guard.policy import loader, validity, yamlsource
from telemetry_guard.sidecar.forward import DEFAULT_WINDOW
from telemetry_guard.sidecar.metrics import StreamTally
from telemetry_guard.sidecar.server import GATEWAY_MAX_MESSAGE_BYTES, Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "docs").glob("*.md")}
MIB = 1024 * 1024
WORDS = {"half a second": 0.5, "half second": 0.5}


def stated(text: str, pattern: str) -> list[str]:
    """Every number the pattern's group captures in text (at least one must be found)."""
    found = re.findall(pattern, " ".join(text.split()))
    assert found, f"the docs no longer say {pattern!r}: update this test with them"
    return found


def test_policy_file_size_and_nesting_limits() -> None:
    for mib in stated(README, r"files over (\d+) MiB"):
        assert int(mib) * MIB == yamlsource.MAX_BYTES
    for depth in stated(README, r"files over \d+ MiB, nesting deeper than (\d+)"):  # a policy file's YAML
        assert int(depth) == yamlsource.MAX_DEPTH


def test_message_size_limit_is_the_gateways() -> None:
    for mib in stated(README, r"over the gateway's limit \((\d+) MiB\)"):
        assert int(mib) * MIB == GATEWAY_MAX_MESSAGE_BYTES == Config().max_message_bytes
    assert GATEWAY_MAX_MESSAGE_BYTES <= MAX_MESSAGE_BYTES_LIMIT


def test_stream_window_and_metrics_interval() -> None:
    for count in stated(README, r"at most (\d+) unanswered payloads per stream"):
        assert int(count) == DEFAULT_WINDOW
    for words in stated(README, r"publishe[sd] (?:them )?(?:at least )?every (half a second|half second)"):
        assert WORDS[words] == StreamTally.FLUSH_SECONDS


def test_name_length_and_introspection_cache() -> None:
    for chars in stated(DOCS["policy-reference.md"], r"over (\d+) characters"):
        assert int(chars) == validity.MAX_NAME_LENGTH
    entry = loader.schema("allowlist.schema.json")["properties"]["entries"]["items"]["properties"]
    assert entry["feature"]["maxLength"] == entry["action"]["maxLength"] == validity.MAX_NAME_LENGTH
    defaults = TokenIntrospection.__init__.__kwdefaults__ or {}
    for seconds in stated(DOCS["interceptors.md"], r"`rejection_ttl`, (\d+) s by default"):
        assert float(seconds) == defaults["rejection_ttl"]
