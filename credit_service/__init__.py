"""The credit service: accounts, an append-only ledger and two-phase reservations."""
