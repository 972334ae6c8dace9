"""The Faust app the stages run on: ``faust.App`` with two rebalance holes closed,
and a producer that checks, before each commit, that what it was given was delivered
(``Producer``).

Both holes lose records after a rebalance, silently: the records are fetched but
never reach the stage, and no later fetch brings them back. Both were found with
the SIGKILL conservation test (tests/integration/test_processing_stages.py) on a
loaded machine, in faust-streaming 0.15.3.

1. **Clearing the stream queues twice.** Faust clears every stream queue when
   flow control resumes, to drop records fetched before the rebalance; it then
   fetches them again from the committed offset. A worker that restores a table
   resumes flow twice: once to read the changelogs, and again at the end of
   ``Recovery.on_recovery_completed``, after it resumed the stream partitions and
   sought them to their committed offsets. The fetcher runs between the two, so
   records fetched *after* the seek sit in the queues when the second resume
   clears them. Seen: raw offset 128 of a partition was fetched 1 ms before the
   clear and never counted; offsets 48-59 of another, in a run where that worker
   had just taken over the partition. Here a resume clears only when flow was
   suspended, which is the only time the queues can hold records from before the
   rebalance.

2. **No seek where nothing was committed.** Faust's answer to every record it
   drops on the way (a fetch cut short by a rebalance, a record from an older
   generation, the clear above) is "seek to the committed offset". Where the group
   has not committed yet (a worker dies in its first commit interval, or a new
   group's first rebalance) there is nothing to seek to, aiokafka leaves the
   position where the dropped records already moved it, and they are skipped.
   Here such partitions are sought to their beginning, as
   ``consumer_auto_offset_reset="earliest"`` would do for a new group. What is
   read twice is counted once: the dedupe and aggregate stages drop a batch they
   have seen (see processors/stages.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from processors.stop import undelivered


class FlowControl(FlowControlEvent):
    def resume(self) -> None:
        """Resume, clearing the stream queues only if flow was suspended (hole 1)."""
        if self.is_active():
            return  # the queues hold only records fetched since the last resume
        super().resume()


class Consumer(faust_aiokafka.Consumer):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek to the committed offsets, and to the beginning where there are none (hole 2)."""
        committed = await super().seek_to_committed()
        # aiokafka seeks only to offsets above 0. Only the partitions Faust acks and
        # commits (the agents' topics) are ours to move: changelogs are recovery's.
        fresh = [
            tp
            for tp, offset in committed.items()
            if not offset and self.app.topics.acks_enabled_for(tp.topic) and not self._is_changelog_tp(tp)
        ]
        if fresh:
            await self._thread.seek_to_beginning(*fresh)
        return committed


def failed(in_flight: Mapping[asyncio.Future, str]) -> tuple[str, BaseException] | None:
    """The topic and error of a record of ``in_flight`` that failed, if any did."""
    for sent, topic in in_flight.items():
        if sent.done() and not sent.cancelled() and sent.exception() is not None:
            return topic, cast(BaseException, sent.exception())
    return None


class Producer(faust_aiokafka.Producer):
    """Faust's aiokafka producer, with the records the stages hand it checked: one that
    was not delivered (its retries spent) ends the worker (``stop.undelivered``) before
    a commit can go past the source record that made it. Faust flushes the producer
    before every offset commit.

    A record's callback does that as soon as the loop runs it. The flush checks too,
    for the one case where the callback would run after it: aiokafka drops a batch
    that expired without a partition leader from its queue before it fails it, so a
    flush in that loop turn waits for nothing and the commit would go out first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: dict[asyncio.Future, str] = {}  # a record's future: its topic

    async def send_checked(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        acked: Callable[[Any], None] | None = None,
    ) -> None:
        """Send a record; ``acked`` is called with its metadata once Kafka has it."""
        sent = cast(asyncio.Future, await self.send(topic, key, value, partition, None, None))
        self.in_flight[sent] = topic
        sent.add_done_callback(functools.partial(self.delivered, topic, acked))

    def delivered(self, topic: str, acked: Callable[[Any], None] | None, sent: asyncio.Future) -> None:
        del self.in_flight[sent]
        if sent.cancelled():
            return  # (aiokafka does not cancel a record's future; nothing was delivered)
        err = sent.exception()
        if err is not None:
            undelivered(topic, err)
        elif acked is not None:
            acked(sent.result())

    async def flush(self) -> None:
        await super().flush()
        failure = failed(self.in_flight)
        if failure is not None:
            undelivered(*failure)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Producer = Producer


class App(faust.App):
    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return FlowControl(loop=self.loop)

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)
