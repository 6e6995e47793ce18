"""python -m credit_service: serve credit.v1.CreditService until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import os

from credit_service.config import CreditSettings
from credit_service.server import start
from service_kit import tracing
from service_kit.logs import configure_logging
from service_kit.server import run_main


async def main() -> None:
    settings = CreditSettings.from_environment(os.environ)
    tracing_settings = tracing.TracingSettings.from_environment(os.environ, "credit-service")
    configure_logging(settings.server.log_format, settings.server.log_level, trace_ids=tracing_settings.enabled)
    process_tracing = tracing.install(tracing_settings)
    runtime = await start(settings)
    await runtime.serve_until_signalled()
    # What the exporter still buffers, before the process exits (bounded by its timeout).
    await asyncio.to_thread(process_tracing.shutdown)


if __name__ == "__main__":
    run_main(main)
