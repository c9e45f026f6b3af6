"""python -m telemetry_guard == the telemetry-guard console script."""

import sys

from telemetry_guard.cli import main

sys.exit(main())
