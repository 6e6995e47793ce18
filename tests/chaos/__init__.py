"""The chaos harness: the whole deployment under process kills, outages and a database restart,
then every invariant of DESIGN.md checked from outside. `python -m tests.chaos --help`."""
