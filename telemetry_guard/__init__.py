"""The telemetry-guard command line: one entry point, one module per subcommand."""

from importlib import metadata

DISTRIBUTION = "telemetry-guard"


def version() -> str:
    """The installed distribution's version (--version, serve's log, the metrics, the audit report)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
