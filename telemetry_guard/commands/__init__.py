"""Subcommands of telemetry-guard. Each module defines HELP and register(subparsers).

register() adds the subcommand's parser and sets `func` (args -> exit code).
Modules are found by name, so adding a command is adding a file here.
"""
