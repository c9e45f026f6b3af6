"""The telemetry-guard command line: one entry point, one module per subcommand."""
