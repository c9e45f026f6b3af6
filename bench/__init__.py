"""Benchmarks (not tests): each module prints a table; see its docstring for the command."""
