"""Benchmarks: each module is a program run from the repository root as `python -m bench.NAME`.

Each prints a table and writes its figures as JSON to `bench/results/NAME.json`;
`make bench` runs them all. `common` holds what they share (fio, mounts, tables).
"""
