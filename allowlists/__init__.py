"""Shipped allowlists: data only (YAML files), read by policy.loader through `builtin:NAME` references."""
