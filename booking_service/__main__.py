"""python -m booking_service: serve booking.v1.BookingService until SIGTERM or SIGINT."""

from __future__ import annotations

import os

from booking_service.config import BookingSettings
from booking_service.server import start
from service_kit.logs import configure_logging
from service_kit.server import run_main


async def main() -> None:
    settings = BookingSettings.from_environment(os.environ)
    configure_logging(settings.server.log_format, settings.server.log_level)
    runtime = await start(settings)
    await runtime.serve_until_signalled()


if __name__ == "__main__":
    run_main(main)
