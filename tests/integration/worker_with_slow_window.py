"""``python -m tests.integration.worker_with_slow_window process <stage>``: the real
worker, except that its first snapshot waits 3 s before it goes to the producer, after
creating the file KTEL_TEST_CLOSING names: a window close under way, for a stop to
begin in."""

import asyncio
import os
from pathlib import Path

from ktel.cli import main
from ktel.wire import METRICS_TOPIC
from processors import stages

produce = stages.produce
waited = False


async def slow_first_snapshot(app, topic, *args, **kwargs):
    global waited
    if topic == METRICS_TOPIC and not waited:
        waited = True
        Path(os.environ["KTEL_TEST_CLOSING"]).touch()
        await asyncio.sleep(3)
    await produce(app, topic, *args, **kwargs)


stages.produce = slow_first_snapshot
main()
