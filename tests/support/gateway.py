"""The real Envoy gateway for tests, and a small HTTP/JSON client for it.

`running_gateway` renders a configuration with `devstack.gateway` for the given upstreams into a
folder, starts the real `envoy` binary from the virtual environment the way `make run` does (cwd =
the repository root, so that the relative descriptor path resolves), waits for the admin `/ready`,
and stops the process when the block ends, whatever happened inside. Ports are random and on
127.0.0.1 only.

The in-process servers of the integration tests run on the test's event loop: a blocking HTTP
call from an async test would freeze them and wait forever. `request_json` therefore runs the
blocking `urllib` call on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from devstack.gateway import GatewaySettings, render_envoy_yaml
from tests.support.auth import token
from tests.support.stack import BIN, ROOT, free_port

ENVOY = BIN / "envoy"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# A port from `free_port` is free only until someone else takes it: on a clash, try new ones.
START_ATTEMPTS = 3
HTTP_TIMEOUT_S = 20.0


class GatewayFailed(Exception):
    """Envoy exited, or was not ready in time; the message carries its output."""


@dataclass
class Gateway:
    """A running Envoy: where it listens, and its output for failure messages."""

    settings: GatewaySettings
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.listen_port}"

    @property
    def grpc_target(self) -> str:
        """The same listener, for native gRPC clients (cleartext HTTP/2)."""
        return f"127.0.0.1:{self.settings.listen_port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        return self.process.returncode


def start_gateway(directory: Path, *, booking_upstream: str, credit_upstream: str, **settings: Any) -> Gateway:
    """Renders a configuration into `directory` and starts Envoy with it; blocks until /ready.

    `settings` are further `GatewaySettings` fields (e.g. route_timeout_s).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        gateway_settings = GatewaySettings(
            listen_port=free_port(),
            admin_port=free_port(),
            booking_upstream=booking_upstream,
            credit_upstream=credit_upstream,
            **settings,
        )
        config_path = directory / f"envoy-{gateway_settings.listen_port}.yaml"
        config_path.write_text(render_envoy_yaml(gateway_settings, "Written by tests/support/gateway.py."))
        log_path = directory / f"envoy-{gateway_settings.listen_port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(  # the real envoy binary from the venv, as `make run` starts it
                [str(ENVOY), "-c", str(config_path), "--log-level", "warn", "--disable-hot-restart"],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        gateway = Gateway(gateway_settings, config_path, log_path, process)
        try:
            _wait_ready(gateway)
        except GatewayFailed:
            gateway.stop()
            address_taken = "ddress already in use" in gateway.output()
            if attempt == START_ATTEMPTS or not address_taken:
                raise
            continue
        return gateway
    raise AssertionError("unreachable")


def _wait_ready(gateway: Gateway) -> None:
    ready_url = f"http://127.0.0.1:{gateway.settings.admin_port}/ready"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise GatewayFailed(f"envoy exited with {gateway.process.returncode}:\n{gateway.output()}")
        try:
            with urllib.request.urlopen(ready_url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(POLL_INTERVAL_S)
    raise GatewayFailed(f"envoy not ready after {READY_TIMEOUT_S} s:\n{gateway.output()}")


@contextlib.asynccontextmanager
async def running_gateway(
    directory: Path, *, booking_upstream: str, credit_upstream: str, **settings: Any
) -> AsyncIterator[Gateway]:
    """`start_gateway` off the event loop; the process is stopped when the block ends."""
    gateway = await asyncio.to_thread(
        start_gateway, directory, booking_upstream=booking_upstream, credit_upstream=credit_upstream, **settings
    )
    try:
        yield gateway
    finally:
        await asyncio.to_thread(gateway.stop)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Message
    text: str

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as error:
            raise AssertionError(f"not JSON ({self.status}, {self.content_type}): {self.text!r}") from error


def request_json_blocking(
    method: str,
    url: str,
    body: object = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> HttpResponse:
    """One HTTP call; error statuses are answers too (no exception)."""
    data = None if body is None else json.dumps(body).encode()
    # The operator's token unless the test gives its own; an empty value leaves the header out.
    all_headers = {"accept": "application/json", "authorization": f"Bearer {token()}", **(headers or {})}
    all_headers = {name: value for name, value in all_headers.items() if value}
    if data is not None:
        all_headers.setdefault("content-type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)  # noqa: S310  # loopback
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310  # loopback http
            return HttpResponse(response.status, response.headers, response.read().decode())
    except urllib.error.HTTPError as error:
        with error:
            return HttpResponse(error.code, error.headers, error.read().decode())


async def request_json(
    method: str,
    url: str,
    body: object = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> HttpResponse:
    """`request_json_blocking` on a thread, so the in-process servers keep serving meanwhile."""
    return await asyncio.to_thread(request_json_blocking, method, url, body, headers=headers, timeout_s=timeout_s)
