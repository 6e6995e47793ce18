"""The benchmark: the two-service booking design against a single-transaction baseline.

`python -m bench` (or `make bench`) starts PostgreSQL (embedded unless given a server), both
services as real processes, and the baseline's PL/pgSQL function; then, for each scenario and each
design, a load generator in a separate process (`python -m bench.loadgen`) books for a fixed time
at a fixed concurrency. The run checks the books after each scenario, prints a table and the
ratio of the two designs, and writes JSON and an SVG chart to `bench-results/`.

Modules: `scenarios` (what each scenario books), `loadgen` (the load generator process),
`stack` (PostgreSQL and the service processes), `baseline` (+ `baseline.sql`, the single-function
design), `checks` (correctness from outside, through SQL), `report` (table, JSON, SVG).
"""
