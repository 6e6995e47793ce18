"""structlog set-up: JSON lines in production, a console renderer on a terminal.

Request context is bound through contextvars by the server interceptor and cleared per RPC, so
every line logged while serving a call carries its method and request id; with tracing on
(service_kit/tracing.py) also the `trace_id` and `span_id` of the active span.

Colour follows the usual conventions: the console renderer colours its output only when stderr is
a terminal, never when `NO_COLOR` is set (https://no-color.org), and always when `FORCE_COLOR` is
(`make run` sets one or the other for its children, whose stderr is a pipe to it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog

from service_kit.tracing import log_trace_ids

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def use_colour(env: Mapping[str, str], is_terminal: bool) -> bool:
    """NO_COLOR wins, then FORCE_COLOR, then whether the output is a terminal."""
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    return is_terminal


def configure_logging(
    log_format: str = "auto",
    log_level: str = "info",
    *,
    trace_ids: bool = False,
    env: Mapping[str, str] | None = None,
) -> None:
    """Configures structlog for the process. Call once, from main, never at import time.
    `trace_ids`: tracing is on; each line gets the active span's ids (one lookup per line, so
    only then). `env`: where NO_COLOR and FORCE_COLOR are read (default: the process's)."""
    environment = env if env is not None else os.environ
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=use_colour(environment, sys.stderr.isatty()))
        if use_console
        else structlog.processors.JSONRenderer()
    )
    processors: list[structlog.types.Processor] = [structlog.contextvars.merge_contextvars]
    if trace_ids:
        processors.append(log_trace_ids)
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[log_level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (asyncpg, grpc) go to stderr as well.
    logging.basicConfig(level=max(LEVELS[log_level], logging.WARNING), stream=sys.stderr)


# grpcio logs a metadata value that is not UTF-8 with a traceback at ERROR, each time the call's
# metadata is read, and reads the value as Latin-1 (grpc/_cython/_cygrpc/grpc_string.pyx.pxi,
# `_decode`). Such a header is the caller's mistake, not the server's: a warning without traceback.
GRPC_CYTHON_LOGGER = "grpc._cython.cygrpc"
_GRPC_INVALID_ENCODING = "Invalid encoding on %s"


class InvalidMetadataEncoding(logging.Filter):
    """Turns grpcio's ERROR for a metadata value that is not UTF-8 into a WARNING without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _GRPC_INVALID_ENCODING:
            # The value is not shown: it may be an Authorization header.
            record.msg = "a caller sent a metadata value that is not UTF-8 (read as Latin-1)"
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def quiet_caller_metadata_errors() -> None:
    """Installs InvalidMetadataEncoding on grpcio's logger, once per process."""
    logger = logging.getLogger(GRPC_CYTHON_LOGGER)
    if not any(isinstance(existing, InvalidMetadataEncoding) for existing in logger.filters):
        logger.addFilter(InvalidMetadataEncoding())
