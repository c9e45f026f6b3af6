"""Engine throughput against the floor (parse + serialize, no policy), in one run.

    python -m bench.engine            # the README's table
    python -m bench.engine --quick    # fewer repetitions

For each batch size, identifier kind and allowlist size it times, on the same
serialized bytes: the floor (RecordEventsRequest parse + serialize) and the guard
(engine.record_events_bytes: the C fast path of policy/_wirefilter.c where it is built).
The last columns time the engine's Python path alone (Engine(accelerate=False): parse into
the kind's view, filter, serialize), what runs where no C compiler was at hand. Each figure
is the best of several rounds, all interleaved so that machine noise hits them alike.
Targets (issue 2): guard >= 60% of the floor's events/s; Sourcegraph's allowlist as shipped
(builtin:sourcegraph) and the same padded to 10,000 entries within 5% of each other.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import google.protobuf
import grpc
import yaml

from bench import workload
from telemetry_guard.policy import Engine, default_policy_path, fastpath, load_policy
from telemetry_guard.policy.model import Policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

IDENTIFIERS = {
    "licensed_instance": pb.Identifier(
        licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key="key", instance_id="i-1")
    ),
    "managed_service": pb.Identifier(managed_service=pb.Identifier.ManagedServiceIdentifier(service_id="svc")),
}


def policy_with_allowlist(size: int, tmp: Path) -> Policy:
    """The default policy with the Sourcegraph allowlist padded to `size` entries (0: as shipped)."""
    base = yaml.safe_load(default_policy_path().read_text())
    shipped = yaml.safe_load(Path(load_policy(default_policy_path()).allowlist.files[0]).read_text())
    entries = list(shipped["entries"])
    for i in range(size - len(entries)):
        # Feature names admit letters only: spell the number in letters (0 -> a, 1 -> b, ...).
        name = "".join(chr(ord("a") + int(d)) for d in str(i))
        entries.append(
            {"feature": f"padding.f{name}", "action": "viewed", "keys": ["languageId"], "reason": "benchmark padding"}
        )
    (tmp / f"allow{size}.yaml").write_text(yaml.safe_dump({"version": 1, "entries": entries}))
    base["allowlists"] = [f"allow{size}.yaml"]
    (tmp / f"policy{size}.yaml").write_text(yaml.safe_dump(base))
    return load_policy(tmp / f"policy{size}.yaml")


def best_of(rounds: int, repeat: int, fn: Callable[[], object]) -> float:
    """Seconds per call: the best of `rounds` rounds of `repeat` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def measure(
    data: bytes, engines: dict[str, Engine], identifier: pb.Identifier, rounds: int, repeat: int
) -> tuple[float, dict[str, float]]:
    """Seconds per batch: the floor, and the guard under each engine, all interleaved round by round."""
    parse = pb.RecordEventsRequest.FromString

    def floor() -> bytes:
        return parse(data).SerializeToString()

    def guard(engine: Engine) -> Callable[[], object]:
        def run() -> object:  # parse + filter + serialize, and what the sidecar's audit at info reads
            outcome = engine.record_events_bytes(data, identifier)
            return outcome.request, outcome.decision.counts(), outcome.decision.dropped_event_ids

        return run

    floor_s = float("inf")
    guard_s = dict.fromkeys(engines, float("inf"))
    for _ in range(rounds):  # interleaved: machine noise hits every figure alike
        floor_s = min(floor_s, best_of(1, repeat, floor))
        for size, engine in engines.items():
            guard_s[size] = min(guard_s[size], best_of(1, repeat, guard(engine)))
    return floor_s, guard_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, noisier)")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 15
    print(
        f"# engine benchmark: Python {platform.python_version()}, protobuf {google.protobuf.__version__} "
        f"({_backend()}), grpcio {grpc.__version__}, {platform.machine()}, best of {rounds} rounds, "
        f"C fast path {'built' if fastpath.AVAILABLE else 'NOT BUILT (guard = Python path)'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        policies = {size: policy_with_allowlist(size, Path(tmp)) for size in (0, 10_000)}
        n = f"{len(policies[0].allowlist):,}"  # event types of Sourcegraph's list as shipped
        print(
            f"| batch | workload | kind | bytes/event | floor ev/s | guard ev/s ({n} / 10,000 entries) "
            f"| guard/floor ({n} / 10,000) | 10,000 vs {n} | Python path ev/s | Python path/floor |"
        )
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for batch_size in (100, 1000):
            repeat = max(1, 20_000 // batch_size)
            for scenario in ("raw", "redacted"):
                data = workload.batch(batch_size, redacted=scenario == "redacted").SerializeToString()
                for kind, identifier in IDENTIFIERS.items():
                    engines = {
                        "shipped": Engine(policies[0]),
                        "10000": Engine(policies[10_000]),
                        "python": Engine(policies[0], accelerate=False),
                    }
                    floor_s, guard_s = measure(data, engines, identifier, rounds, repeat)
                    small, large, python = guard_s["shipped"], guard_s["10000"], guard_s["python"]
                    print(
                        f"| {batch_size} | {scenario} | {kind} | {len(data) // batch_size} | "
                        f"{batch_size / floor_s:,.0f} | {batch_size / small:,.0f} / {batch_size / large:,.0f} | "
                        f"{floor_s / small:.0%} / {floor_s / large:.0%} | {small / large:.1%} | "
                        f"{batch_size / python:,.0f} | {floor_s / python:.0%} |"
                    )
    return 0


def _backend() -> str:
    from google.protobuf.internal import api_implementation

    return api_implementation.Type()


if __name__ == "__main__":
    raise SystemExit(main())
