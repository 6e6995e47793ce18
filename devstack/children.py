"""Child processes of the runner: started with their output prefixed, stopped with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Enough to show why a process failed at startup (a traceback, a config error) without flooding.
RECENT_LINES_KEPT = 40
# asyncio's default of 64 KiB is smaller than one JSON log line with a long traceback.
_LINE_LIMIT_BYTES = 1024 * 1024
_DRAIN_TIMEOUT_S = 2.0
_NAME_WIDTH = 8
_COLORS = {"credit": "36", "booking": "35", "gateway": "33", "devstack": "1"}


@dataclass(frozen=True)
class Printer:
    """Writes lines to our stdout behind a `name |` prefix, in color on a terminal."""

    color: bool

    @classmethod
    def for_stdout(cls, env: Mapping[str, str]) -> Printer:
        # https://no-color.org: a set NO_COLOR turns colors off.
        return cls(color=sys.stdout.isatty() and not env.get("NO_COLOR"))

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<{_NAME_WIDTH}} |"
        if self.color:
            prefix = f"\x1b[{_COLORS.get(name, '0')}m{prefix}\x1b[0m"
        sys.stdout.write(f"{prefix} {text}\n")
        sys.stdout.flush()

    def say(self, text: str) -> None:
        self.line("devstack", text)

    def block(self, lines: Sequence[str]) -> None:
        """Unprefixed lines, so that commands in them can be copied as they are."""
        sys.stdout.write("\n" + "".join(f"{line}\n" for line in lines) + "\n")
        sys.stdout.flush()


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    recent_lines: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_LINES_KEPT))
    pump: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def stop(self, grace_s: float, printer: Printer) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code (negative: signal)."""
        if self.process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                printer.say(f"{self.name} did not stop within {grace_s:g} s after SIGTERM: killing it")
                self._signal(signal.SIGKILL)
                await self.process.wait()
        await self._drain_output()
        returncode = self.process.returncode
        assert returncode is not None
        return returncode

    def _signal(self, signal_number: signal.Signals) -> None:
        # It may have exited since we last looked.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal_number)

    async def _drain_output(self) -> None:
        if self.pump is None:
            return
        # A grandchild holding the pipe open must not hold up our exit.
        try:
            await asyncio.wait_for(asyncio.shield(self.pump), _DRAIN_TIMEOUT_S)
        except TimeoutError:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pump


async def start_child(name: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], printer: Printer) -> Child:
    """Start `argv` with stdout and stderr merged into our output, each line behind `name |`.

    The child stays in our process group, so that a Ctrl-C in the terminal reaches it too and a
    runner killed outright does not leave it behind in a terminal session.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        limit=_LINE_LIMIT_BYTES,
    )
    child = Child(name=name, process=process)
    assert process.stdout is not None
    child.pump = asyncio.create_task(_pump_lines(child, process.stdout, printer), name=f"{name}-output")
    return child


async def _pump_lines(child: Child, stream: asyncio.StreamReader, printer: Printer) -> None:
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            # Over the limit: asyncio has dropped that line; carry on with the next one.
            printer.line(child.name, f"[a line over {_LINE_LIMIT_BYTES} bytes was dropped]")
            continue
        if not raw:
            return
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        child.recent_lines.append(text)
        printer.line(child.name, text)


async def first_exit(children: Sequence[Child]) -> Child:
    """Wait until any of `children` exits and return it."""
    waits = {asyncio.create_task(child.process.wait()): child for child in children}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return waits[next(iter(done))]
