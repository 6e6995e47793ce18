"""structlog set-up: JSON lines in production, a console renderer on a terminal.

Request context is bound through contextvars by the server interceptor and cleared per RPC, so
every line logged while serving a call carries its method and request id.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(log_format: str = "auto", log_level: str = "info") -> None:
    """Configures structlog for the process. Call once, from main, never at import time."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
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
