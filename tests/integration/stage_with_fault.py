"""``python -m tests.integration.stage_with_fault process <stage>``: the real worker,
except that, given KTEL_TEST_KILL_AFTER_RECORD=N, it SIGKILLs itself once Kafka has
its N-th changelog record (a host's snapshot or delta, processors/changelog.py),
before the batch that made it is committed or has sent anything on."""

import os
import signal

from ktel.cli import main
from processors import stages

KILL_AT = int(os.environ["KTEL_TEST_KILL_AFTER_RECORD"])
persist = stages.persist
written = 0


async def persist_then_die(table, key, value, record_key, record, source):
    global written
    await persist(table, key, value, record_key, record, source)
    written += 1
    if written == KILL_AT:
        await table.app.producer.flush()  # acknowledged by Kafka (acks=all)
        os.kill(os.getpid(), signal.SIGKILL)


stages.persist = persist_then_die
main()
