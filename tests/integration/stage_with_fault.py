"""``python -m tests.integration.stage_with_fault process <stage>``: the real worker,
except that, given KTEL_TEST_KILL_BEFORE_HEAD=N, it SIGKILLs itself in the middle of
the N-th record whose change has entries (processors/changelog.py): once Kafka has
the first half of those entries' records, before the rest and the host's head."""

import os
import signal

from ktel.cli import main
from processors import stages

KILL_AT = int(os.environ["KTEL_TEST_KILL_BEFORE_HEAD"])
persist = stages.persist
with_entries = 0


async def persist_then_die(table, key, value, entries, head):
    global with_entries
    if entries:
        with_entries += 1
    if with_entries < KILL_AT or not entries:
        return await persist(table, key, value, entries, head)
    for entry_key, entry in entries[: (len(entries) + 1) // 2]:
        await stages.send(table, entry_key, entry, table.partition_for_key(key))
    await table.app.producer.flush()  # acknowledged by Kafka (acks=all)
    os.kill(os.getpid(), signal.SIGKILL)


stages.persist = persist_then_die
main()
