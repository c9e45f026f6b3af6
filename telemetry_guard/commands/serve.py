"""telemetry-guard serve: the sidecar in front of the Telemetry Gateway."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import signal
import socket
import ssl
import sys
import urllib.parse
from typing import Any

HELP = "run the sidecar: enforce the policy on telemetrygateway.v1 calls and forward what passes upstream"

EPILOG = """\
examples:
  telemetry-guard serve --listen 0.0.0.0:10085 --upstream gateway.internal:10080 --policy policy.yaml
  telemetry-guard serve --listen 127.0.0.1:10085 --gateway-output events.jsonl   # embedded gateway
  telemetry-guard serve --listen 0.0.0.0:10085 --upstream gateway:443 --upstream-ca ca.pem \\
      --tls-cert tls.crt --tls-key tls.key --metrics-listen 0.0.0.0:9090 --workers 2

  telemetry-guard serve --upstream gateway:10080 --policy policy.yaml --shadow-policy candidate.yaml

signals: SIGHUP reloads the policy and the shadow policy (so does a change of their files);
SIGTERM stops gracefully (health NOT_SERVING, --drain seconds still serving, then --grace for
the calls in flight).
exit status: 0 stopped by SIGTERM, 1 a worker failed while stopping, 2 bad arguments, a policy
that cannot be loaded or that lint refuses, an address that cannot be bound; 3 --workers kept
dying (a crash loop: a dead worker is otherwise replaced).
logs: JSON lines on stderr (the audit trail included). --log-level debug adds, for a message
that lost named keys, a record naming them (private_metadata keys, user and organization
fields), the shadow's named differences, and every logger's debug records (grpc's stays at
warning); never a removed value.
"""


# gRPC takes message sizes as a C int.
MAX_MESSAGE_BYTES_LIMIT = 2**31 - 1
# A gRPC metadata key: lowercase ASCII letters, digits, '-', '_' and '.' (grpc- is reserved).
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _message_bytes(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_MESSAGE_BYTES_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_MESSAGE_BYTES_LIMIT} (gRPC's limit), not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, not {value}")
    return value


def _metadata_key(text: str) -> str:
    if not _METADATA_KEY.fullmatch(text) or text.startswith("grpc-"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a gRPC metadata key (lowercase letters, digits, '-', '_', '.'; not grpc-...)"
        )
    return text


def register(sub: Any) -> None:
    from telemetry_guard.sidecar.logs import LEVELS  # the sidecar is imported lazily: see run()

    parser = sub.add_parser(
        "serve",
        help=HELP,
        description=HELP + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    where = parser.add_argument_group("addresses")
    where.add_argument(
        "--listen",
        default="127.0.0.1:10085",
        metavar="HOST:PORT",
        help="where exporters connect (default: %(default)s; port 0: any free port, logged)",
    )
    where.add_argument(
        "--upstream",
        metavar="HOST:PORT",
        help="the Telemetry Gateway; without it an embedded gateway records what passes",
    )
    where.add_argument(
        "--gateway-output",
        default="-",
        metavar="FILE",
        help="embedded gateway: JSON lines of what it received, appended to FILE (default: stdout)",
    )
    where.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics")
    policy = parser.add_argument_group("policy")
    policy.add_argument("--policy", metavar="FILE", help="policy file (default: the built-in default policy)")
    policy.add_argument(
        "--shadow-policy",
        metavar="FILE",
        help="a candidate policy judging every message too, in shadow: it decides nothing; where it would let "
        "out or remove otherwise than --policy is counted (metrics) and logged (audit lines), never a value. "
        "A candidate that does not load or that lint refuses is logged and ignored",
    )
    policy.add_argument(
        "--shadow-sample",
        type=_rate,
        metavar="RATE",
        help="share of messages the shadow policy judges, in (0, 1]: an even, deterministic share per process "
        "(default: 1; stream admissions are always compared)",
    )
    policy.add_argument(
        "--reload-interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="how often the policy's files are checked for changes; 0: only on SIGHUP (default: %(default)s)",
    )
    policy.add_argument(
        "--allow-unsafe-policy",
        action="store_true",
        help="enforce a policy that `telemetry-guard lint` refuses (an error it does not acknowledge); "
        "without it such a policy is refused at start and on reload. Its findings are logged at error on every load",
    )
    policy.add_argument(
        "--introspection-url",
        metavar="URL",
        help="verify bearer tokens by OAuth 2.0 token introspection (RFC 7662) at URL "
        "(default: a token must be present; the gateway verifies it)",
    )
    policy.add_argument(
        "--introspection-client-id",
        metavar="ID",
        help="client id for the introspection endpoint; the secret is read from "
        "$TELEMETRY_GUARD_INTROSPECTION_CLIENT_SECRET",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-cert", metavar="FILE", help="server certificate chain (PEM); with --tls-key")
    tls.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    tls.add_argument("--upstream-tls", action="store_true", help="TLS to the upstream, verified by the system roots")
    tls.add_argument("--upstream-ca", metavar="FILE", help="TLS to the upstream, verified by this CA bundle (PEM)")
    tls.add_argument(
        "--upstream-server-name",
        metavar="NAME",
        help="the name the upstream's certificate must carry, if not the --upstream host",
    )
    run_group = parser.add_argument_group("process")
    run_group.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="serving processes sharing the port (SO_REUSEPORT; default: %(default)s)",
    )
    run_group.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long calls in flight may take to finish (default: %(default)s)",
    )
    run_group.add_argument(
        "--drain",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, first report NOT_SERVING on the health service and keep accepting calls this long, "
        "so that load balancers stop sending new ones; a second SIGTERM cuts it short (default: %(default)s)",
    )
    run_group.add_argument(
        "--max-message-bytes",
        type=_message_bytes,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="largest request message accepted, as the gateway (default: %(default)s; larger: RESOURCE_EXHAUSTED)",
    )
    run_group.add_argument(
        "--forward-metadata",
        action="append",
        type=_metadata_key,
        metavar="KEY",
        help="call metadata passed upstream besides authorization and the trace context "
        "(traceparent, tracestate, grpc-trace-bin), which always pass (repeat)",
    )
    run_group.add_argument("--log-level", choices=LEVELS, default="info", help="default: %(default)s")
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    """The Config the flags describe, after checking each flag as far as can be done before serving
    (addresses free, files readable and of the right kind): ValueError naming the flag otherwise."""
    from telemetry_guard.sidecar.forward import DEFAULT_FORWARD_METADATA
    from telemetry_guard.sidecar.server import INTROSPECTION_SECRET_ENV, Config, split_host_port

    for name in ("listen", "upstream", "metrics_listen"):
        value = getattr(args, name)
        if value is not None:
            try:
                split_host_port(value)
            except ValueError as exc:
                raise ValueError(f"{_flag(name)} {exc}") from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key", "upstream_ca", "policy"):
        path = getattr(args, name)
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:  # reported as a usage error, naming the flag and the file
                raise ValueError(f"{_flag(name)} {path}: cannot read: {exc.strerror or exc}") from None
    if args.shadow_sample is not None and args.shadow_policy is None:
        raise ValueError("--shadow-sample needs --shadow-policy")
    if args.upstream is None and (args.upstream_tls or args.upstream_ca or args.upstream_server_name):
        raise ValueError("--upstream-tls, --upstream-ca and --upstream-server-name need --upstream")
    _check_tls(args)
    if args.introspection_client_id is not None:
        if args.introspection_url is None:
            raise ValueError("--introspection-client-id needs --introspection-url")
        if not os.environ.get(INTROSPECTION_SECRET_ENV):
            raise ValueError(f"--introspection-client-id needs the client secret in ${INTROSPECTION_SECRET_ENV}")
    if args.introspection_url is not None:
        url = urllib.parse.urlsplit(args.introspection_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"--introspection-url {args.introspection_url!r} is not an http:// or https:// URL")
    if args.upstream is None and args.gateway_output != "-":
        try:
            with open(args.gateway_output, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ValueError(f"--gateway-output {args.gateway_output}: cannot write: {exc.strerror or exc}") from None
    _check_listen("--listen", args.listen, reuse_port=args.workers > 1)
    if args.metrics_listen is not None:
        if _same_address(args.listen, args.metrics_listen):
            raise ValueError(f"--metrics-listen {args.metrics_listen} is the --listen address")
        _check_listen("--metrics-listen", args.metrics_listen)
    return Config(
        listen=args.listen,
        upstream=args.upstream,
        policy=args.policy,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        upstream_tls=args.upstream_tls,
        upstream_ca=args.upstream_ca,
        upstream_server_name=args.upstream_server_name,
        gateway_output=args.gateway_output,
        metrics_listen=args.metrics_listen,
        workers=args.workers,
        grace=args.grace,
        drain=args.drain,
        reload_interval=args.reload_interval,
        max_message_bytes=args.max_message_bytes,
        forward_metadata=tuple(dict.fromkeys([*DEFAULT_FORWARD_METADATA, *(args.forward_metadata or ())])),
        introspection_url=args.introspection_url,
        introspection_client_id=args.introspection_client_id,
        log_level=args.log_level,
        allow_unsafe_policy=args.allow_unsafe_policy,
        shadow_policy=args.shadow_policy,
        shadow_sample=1.0 if args.shadow_sample is None else args.shadow_sample,
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_tls(args: argparse.Namespace) -> None:
    """Certificates and keys that ssl cannot load would fail later, with gRPC's less specific words."""
    if args.tls_cert and args.tls_key:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ValueError(
                f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: not a PEM certificate chain and its "
                f"private key ({reason})"
            ) from None
    if args.upstream_ca:
        try:
            ssl.create_default_context(cafile=args.upstream_ca)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ValueError(f"--upstream-ca {args.upstream_ca}: not a PEM CA bundle ({reason})") from None


def _check_listen(flag: str, address: str, *, reuse_port: bool = False) -> None:
    """Bind address once and let it go: a busy port or an unknown host is a one-line error now,
    not a failure inside the server (gRPC's words) or a traceback (the metrics server's)."""
    from telemetry_guard.sidecar.server import split_host_port

    host, port = split_host_port(address)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"{flag} {address}: cannot listen: unknown host {host!r} ({exc.strerror})") from None
    family, kind, proto, _, where = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            raise ValueError(f"{flag} {address}: cannot listen: {(exc.strerror or str(exc)).lower()}") from None


def _same_address(one: str, other: str) -> bool:
    from telemetry_guard.sidecar.server import split_host_port

    (host_a, port_a), (host_b, port_b) = split_host_port(one), split_host_port(other)
    return port_a == port_b != 0 and (host_a == host_b or "0.0.0.0" in (host_a, host_b) or "::" in (host_a, host_b))


def run(args: argparse.Namespace) -> int:
    # Imports here, not at the top: the CLI imports every command to build its parser, and
    # --workers must switch prometheus_client to multiprocess mode before any metric exists.
    import os

    from telemetry_guard.sidecar import logs, spans

    try:
        config = _config(args)
        spans.check_environment(os.environ)  # TracingError (a ValueError): tracing asked for, not possible
    except (ValueError, OSError) as exc:
        print(f"telemetry-guard serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    # A SIGHUP before the server installs its reload handler must not kill the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.workers == 1:
        return _serve(config, reuse_port=False)
    from telemetry_guard.sidecar import workers
    from telemetry_guard.sidecar.reload import load_validated
    from telemetry_guard.sidecar.server import split_host_port

    load_validated(config.policy, allow_unsafe_policy=config.allow_unsafe_policy)  # fail before forking (CLI reports)
    host, port = split_host_port(config.listen)
    metrics = split_host_port(config.metrics_listen) if config.metrics_listen else None
    return workers.supervise(config.workers, host, port, lambda bound: _worker(config, host, bound), metrics)


def _worker(config: Any, host: str, port: int) -> int:
    from dataclasses import replace

    from telemetry_guard.sidecar.server import join_host_port

    return _serve(replace(config, listen=join_host_port(host, port)), reuse_port=True)


def _serve(config: Any, *, reuse_port: bool) -> int:
    import os

    from telemetry_guard.sidecar import spans
    from telemetry_guard.sidecar.server import Sidecar

    try:
        tracing = spans.from_environment(os.environ)  # in each worker: after the fork
    except spans.TracingError as exc:  # an exporter that cannot start
        print(f"telemetry-guard serve: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        return await Sidecar(config, reuse_port=reuse_port, tracing=tracing).run()

    try:
        return asyncio.run(main())
    finally:
        if tracing is not None:
            tracing.shutdown()
