"""python -m booking_service: serve booking.v1.BookingService until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import os

from booking_service.config import BookingSettings
from booking_service.server import start
from service_kit import tracing
from service_kit.logs import configure_logging
from service_kit.server import run_main


async def main() -> None:
    settings = BookingSettings.from_environment(os.environ)
    tracing_settings = tracing.TracingSettings.from_environment(os.environ, settings.service_name)
    configure_logging(settings.server.log_format, settings.server.log_level, trace_ids=tracing_settings.enabled)
    process_tracing = tracing.install(tracing_settings)
    runtime = await start(settings)
    await runtime.serve_until_signalled()
    # What the exporter still buffers, before the process exits (bounded by its timeout).
    await asyncio.to_thread(process_tracing.shutdown)


if __name__ == "__main__":
    run_main(main)
