"""Whether the stages before a split stage have passed on what their input held (split
mode: enrich, sample and aggregate each in its own workers).

A split stage sees a host only through the stages before it. When one of them stops
(its workers crash-looping, its pods unscheduled) for longer than
``aggregate.host_ttl_seconds``, every host of its partitions falls silent here, and this
stage would forget them as it forgets a host that stopped sending: the aggregate would
end their series with stale markers, and once the stage before came back, count their
batches afresh from 0 (docs/guarantees.md). The worker's own backlog after it took a
partition over is known in the worker (``App.backlog``); what waits in the stages
before it is known only to Kafka.

So a split stage asks Kafka, every ``check_every(ttl)``, for each stage up to and including
itself, the group's committed offset on each partition of its input, and the input's
end. A partition is *behind* while some group's commit on it is short of the end that
partition had at the check before: a record that waited there for a whole check has not
been passed on. A partition's records that came within the last check are not counted:
a busy partition always has some, and its hosts would never be forgotten.

A record can go through several stages between two checks, each of which finds it in
no stage's input at both: a stage that comes back passes its backlog on within one
check, and the stages after it find it only at the check after. So a partition found
behind stays held for as many checks after as there are stages asked: at each check a
record in flight that none finds has moved on by a stage at least since the one before,
so it is through them all by then. The hosts of a partition held are not forgotten
(``held``).

What this leaves: a record that reaches a stage just after a check holds its partition
from the second check after it. During an outage, a host whose batches come further
apart than its TTL less two checks can still be forgotten.

From a start, and after a check Kafka did not answer, every partition is held until two
checks have answered and as many more as there are stages asked, as if found behind:
forgetting waits, it is never done on what is not known.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Gauge

from ktel.kafka_client import Kafka, client_kwargs, start, started

log = logging.getLogger("ktel.process")

HELD = Gauge(
    "ktel_processor_partitions_held_upstream",
    "partitions whose silent hosts this split stage does not forget, a stage before it not "
    "having passed on what it held (all of them while Kafka does not say)",
    ["stage"],
)

# How often the groups' commits and their inputs' ends are looked up: a quarter of the
# hosts' TTL, so that a stage stopped is known to be behind (two checks after a record
# waits in it) well before a host it holds up falls silent for that long; within 5 s,
# more than a worker's commit interval (Faust's 2.8 s) and the time to handle a record and
# have Kafka take what it sent, so that a stage keeping up has committed at each check
# what its input held at the check before (while it has not, its hosts are held:
# forgetting waits), and 15 s.
CHECK_MIN_S, CHECK_MAX_S = 5.0, 15.0


def check_every(ttl_s: float) -> float:
    return min(max(ttl_s / 4, CHECK_MIN_S), CHECK_MAX_S)


Offsets = Mapping[TopicPartition, int]


def behind(ends_before: Offsets, committed: Mapping[str, Offsets], inputs: Mapping[str, str]) -> set[int]:
    """The partitions on which some group of ``inputs`` (group -> the topic it reads) has
    not committed up to where its input ended at the check before (``ends_before``);
    ``committed``: group -> its commits (a partition it never committed on: none)."""
    out = set()
    for group, topic in inputs.items():
        mine = committed.get(group, {})
        for tp, end in ends_before.items():
            if tp.topic == topic and mine.get(tp, 0) < end:
                out.add(tp.partition)
    return out


class Upstream:
    """The partitions held back from forgetting (``held``), from the checks so far."""

    def __init__(self, stage: str, inputs: Mapping[str, str], partitions: int, every_s: float) -> None:
        self.gauge = HELD.labels(stage)
        self.inputs = dict(inputs)  # group -> the topic it reads
        self.every_s = every_s
        self.all = set(range(partitions))
        self.parts = [TopicPartition(t, p) for t in sorted(set(inputs.values())) for p in range(partitions)]
        self.ends: dict[TopicPartition, int] | None = None  # None: not known
        self.checks = 0
        self.until: dict[int, int] = {}  # partition -> the last check it is held at
        self.gauge.set(len(self.all))

    def held(self) -> set[int]:
        return self.all if self.ends is None else set(self.until)

    def checked(self, committed: Mapping[str, Offsets], ends: Offsets) -> None:
        """One check's answers: each group's commits, then the inputs' ends."""
        self.checks += 1
        if self.ends is None:
            # (a start, or a check Kafka did not answer: where records were in the stages is
            # not known, so every partition is held as one found behind would be)
            self.until = dict.fromkeys(self.all, self.checks + len(self.inputs))
        else:
            for p in behind(self.ends, committed, self.inputs):
                self.until[p] = self.checks + len(self.inputs)
            self.until = {p: last for p, last in self.until.items() if last >= self.checks}
        self.ends = dict(ends)
        self.gauge.set(len(self.held()))

    def silent_groups(self, committed: Mapping[str, Offsets], ends: Offsets) -> list[str]:
        """The groups that have committed nothing on an input holding records: their stage
        has not run yet, or Kafka did not say (aiokafka takes an OffsetFetch answer's error
        for the group, a principal without Describe on it, as no commits)."""
        return [
            group
            for group, topic in self.inputs.items()
            if not committed.get(group) and any(end > 0 for tp, end in ends.items() if tp.topic == topic)
        ]

    def unknown(self) -> None:
        """A check Kafka did not answer: nothing is known, and the next that is answered
        holds every partition as one found behind (``checked``)."""
        self.ends = None
        self.gauge.set(len(self.all))

    async def follow(
        self, kafka: Kafka, stopping: Callable[[], bool], sleep: Callable[[float], Awaitable[Any]]
    ) -> None:
        """Check every ``every_s`` until ``stopping``."""
        consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None, enable_auto_commit=False)
        admin = AIOKafkaAdminClient(**client_kwargs(kafka))
        failed: str | None = None
        told: set[str] = set()  # (the groups silent_groups named, each logged once while it is)
        who = "ktel process (upstream check)"
        async with started(consumer, kafka, who):
            try:
                await start(admin, kafka, who)
                while not stopping():
                    try:
                        async with asyncio.timeout(self.every_s):
                            committed = {
                                group: _offsets(await admin.list_consumer_group_offsets(group))
                                for group in self.inputs
                            }
                            ends = await consumer.end_offsets(self.parts)
                        self.checked(committed, ends)
                        silent = set(self.silent_groups(committed, ends))
                        for group in sorted(silent - told):
                            log.warning(
                                "group %s has committed nothing on %s, which holds records: its stage "
                                "has not run yet, or this worker's principal may not read the group's "
                                "offsets (Read on the group: `ktel acls`); the hosts of those "
                                "partitions are not forgotten as silent meanwhile",
                                group,
                                self.inputs[group],
                            )
                        told = silent
                        if failed is not None:
                            log.info("the stages before this one can be checked again")
                            failed = None
                    except (KafkaError, OSError, TimeoutError) as err:
                        self.unknown()
                        why = f"{type(err).__name__}: {err}"
                        if why != failed:
                            log.warning(
                                "cannot tell whether the stages before this one (groups %s) have "
                                "passed on what they read (%s): no host is forgotten as silent until "
                                "they can be (the processor's principal needs Read on those groups: "
                                "`ktel acls`)",
                                ", ".join(self.inputs),
                                why,
                            )
                            failed = why
                    await sleep(self.every_s)
            finally:
                await admin.close()


def _offsets(got: Mapping[TopicPartition, OffsetAndMetadata]) -> dict[TopicPartition, int]:
    # (aiokafka gives an offset of -1 for a partition never committed on)
    return {tp: meta.offset for tp, meta in got.items() if meta.offset >= 0}


def inputs_up_to(
    stage: str, order: Sequence[str], group: Callable[[str], str], topic: Callable[[str], str]
) -> dict[str, str]:
    """group -> input topic of each split stage up to and including ``stage``."""
    upto = order[: order.index(stage) + 1]
    return {group(s): topic(s) for s in upto}
