"""``python -m tests.integration.stage_with_fault process <stage>``: the real worker,
except that it SIGKILLs itself around its N-th changelog record (a host's snapshot or
delta, processors/changelog.py), sent once Kafka has what the batch that made it sent
on, before that batch is committed:

- KTEL_TEST_KILL_AFTER_RECORD=N: once Kafka has that record;
- KTEL_TEST_KILL_HOLDING_RECORD=N: without ever sending it, after holding it back for
  KTEL_TEST_HOLD_SECONDS (the host's value changed in the table meanwhile, for the
  window to see, as it would while a record is on its way to Kafka);

or stops itself (SIGSTOP) right before handing its N-th changelog record to the producer,
the batch counted in the host's value, for the test to resume it (SIGCONT):

- KTEL_TEST_STOP_BEFORE_RECORD=N."""

import asyncio
import os
import signal

from ktel.cli import main
from processors import stages

AFTER = int(os.environ.get("KTEL_TEST_KILL_AFTER_RECORD", "0"))
HOLDING = int(os.environ.get("KTEL_TEST_KILL_HOLDING_RECORD", "0"))
STOP = int(os.environ.get("KTEL_TEST_STOP_BEFORE_RECORD", "0"))
persist = stages.persist
written = 0


async def persist_then_die(table, key, record, partition, acked=None):
    global written
    written += 1
    if written == STOP:
        os.kill(os.getpid(), signal.SIGSTOP)
    if written == HOLDING:
        await asyncio.sleep(float(os.environ["KTEL_TEST_HOLD_SECONDS"]))
        os.kill(os.getpid(), signal.SIGKILL)
    await persist(table, key, record, partition, acked)
    if written == AFTER:
        await table.app.producer.flush()  # acknowledged by Kafka (acks=all)
        os.kill(os.getpid(), signal.SIGKILL)


stages.persist = persist_then_die
main()
