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

It also hands the records of the topics the worker reads (its source, and
ktel.heartbeats) to it in lists (``App.take_in_lists``) rather than one by one
through a Faust stream. Faust's fetch loop hands each record to its streams on its
own: it makes four tasks and cancels three for every record (``Service.wait_first``),
and the stream takes it through its own machinery, about 110-125 µs a record of CPU
together (bench/RESULTS.md, "The stream's cost per record"). That is paid per record,
so per host batch and per heartbeat: at fleet scale, with batches of a few events and
every host's heartbeat every 10 s (1,000 a second at 10,000 hosts), it was a large part
of the worker's cost per event. ``Consumer._drain_messages`` is Faust's fetch loop with
one change: the listed topics' records of each fetch go to ``App.lists`` as one list,
with one wait. The worker takes each record as Faust's stream would
(``take_listed``): it drops those of an older generation or fetched before flow was
suspended, tracks the rest as it takes them, and acks them once the list is handled
and what they made handed to the producer (``App.before_acks``), so Faust commits only
handled records; the list queue is flow controlled and cleared with the
streams' queues on a rebalance (which drops a list the loop is waiting to put, not the
loop: ``_put_list``), and Faust's sensors hear of each record as they would from a stream.

At each assignment (each seek to the committed offsets) the worker also notes each
partition of those topics as being read until it has read up to where the partition
ended then (``App.note_backlog``): until then, a host of it that sent
nothing for a while may have batches still unread (the stages' silent hosts,
processors/stages.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

import faust
from aiokafka.consumer import group_coordinator
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from processors.stop import end, undelivered
from processors.upstream import Upstream

# Fetched lists of the listed topics held before the fetch loop waits (App.take_in_lists).
LISTS_HELD = 4
# How long the worker handles records of a list before it lets the event loop run.
YIELD_S = 0.02
# How often a worker whose membership lapsed looks whether it is back (Membership.held).
MEMBERSHIP_POLL_S = 0.05


class Membership:
    """Whether this worker is still the consumer group member that owns its partitions,
    as far as it can know: the fence before every record it sends (``Producer``).

    Kafka does not fence a member it removed: one whose process stopped past the group's
    session timeout (a VM paused, SIGSTOP, a long pause of the interpreter) has its
    partitions given to another worker, which recovers their hosts from the changelog
    and counts their batches from the committed offsets; resumed, the removed one went
    on as before with what it had fetched and its windows due, for the hundreds of ms
    until a heartbeat told it: it sent its older counts of those hosts to ktel.metrics
    after the new owner's (a series going back, which increase() reads as a counter reset
    and counts twice) and its changelog records after the new owner's (a snapshot among
    them becomes what the next worker to recover the host finds).

    So a worker sends a record only within its session as the broker counts it: less
    than the session timeout since it sent the last heartbeat (or SyncGroup) the broker
    answered as a member's (the broker's own deadline runs from when it got it, later),
    and less than the rebalance timeout since it sent the last one answered with the
    group stable (not "rebalancing"): a rebalance another worker starts (joining, leaving)
    removes the members that have not joined it again by then, however recent their
    last heartbeat, and a stopped worker joins nothing (the rebalance timeout, Faust's
    broker_rebalance_timeout, is 60 s; ktel's session timeout may be up to 300 s).
    Past that it waits: a heartbeat answered as a member's sends on; one answered
    "unknown member" or "illegal generation" (the broker removed it) ends the worker
    (``end``) with nothing more sent or committed, as a SIGKILL would (the stages count
    nothing twice across one: processors/stages.py), and its supervisor starts it afresh.
    So does a SyncGroup answered under another member id than the last one while it
    waits: the worker joined anew, so the group had removed it, whether a heartbeat or
    something else (an offset commit, a JoinGroup) told aiokafka, and the record it waits
    to send was made while another worker may have held its partitions.

    Left open: records aiokafka already held when the process stopped (handed to the
    producer within the session, not yet sent) go out when it resumes. Fencing those
    needs the broker (Kafka transactions, a producer epoch per partition owner).

    aiokafka keeps no such time: its coordinator's heartbeat and sync calls are wrapped
    (``watch_group``) to note them, by group id (the app's id), from the consumer's
    thread; the producer reads them in the worker's loop."""

    def __init__(self) -> None:
        self.session_s = 0.0
        self.alive_at: float | None = None  # monotonic time of the last answered proof's send
        self.removed = False
        # Monotonic time by which a rebalance may have removed it (None: none noted).
        self.rebalanced_by: float | None = None
        self.member_id: str | None = None  # the one the last SyncGroup was answered under
        self.joins = 0  # SyncGroups answered under a member id other than the one before

    def joined(self, member_id: str) -> None:
        if self.member_id is not None and member_id != self.member_id:
            self.joins += 1
        self.member_id = member_id

    def renewed(self, at: float, session_s: float) -> None:
        self.session_s = session_s
        if self.alive_at is None or at > self.alive_at:
            self.alive_at = at

    def stable(self, at: float, rebalance_s: float) -> None:
        """The group was stable when the broker got the proof sent at ``at``: a rebalance
        started after that removes this worker no sooner than ``rebalance_s`` later."""
        if self.rebalanced_by is None or at + rebalance_s > self.rebalanced_by:
            self.rebalanced_by = at + rebalance_s

    def current(self) -> bool:
        now = time.monotonic()
        return (
            not self.removed
            and self.alive_at is not None
            and now - self.alive_at < self.session_s
            and (self.rebalanced_by is None or now < self.rebalanced_by)
        )

    async def held(self, group: str) -> None:
        """Until the worker is known to hold its membership; ends it if it was removed,
        or joined the group anew meanwhile (its removal then possibly seen by no heartbeat,
        or cleared by the SyncGroup before this looked)."""
        joins = self.joins
        while True:
            # (current first: the consumer's thread counts a join before it renews)
            current = self.current()
            if self.removed or self.joins != joins:
                end(
                    f"ktel process: stopping: consumer group {group} removed this worker (no heartbeat "
                    f"reached it for the session timeout, {self.session_s:g} s: the process stopped or "
                    "the coordinator was out of reach); its partitions are another worker's, and "
                    "nothing it held is sent or committed: restart the worker (its supervisor does)"
                )
            if current:
                return
            await asyncio.sleep(MEMBERSHIP_POLL_S)


MEMBERSHIPS: dict[str, Membership] = {}


def membership(group: str) -> Membership:
    member = MEMBERSHIPS.get(group)
    if member is None:
        member = MEMBERSHIPS[group] = Membership()
    return member


def watch_group() -> None:
    """Note in ``MEMBERSHIPS`` each heartbeat and SyncGroup the broker answers as a
    member's (the time it was sent), and a heartbeat it answers that the member is
    gone (aiokafka 0.14.0's ``GroupCoordinator``)."""
    coordinator = group_coordinator.GroupCoordinator
    rebalance = group_coordinator.CoordinatorGroupRebalance
    if getattr(coordinator, "ktel_watched", False):
        return
    do_heartbeat = coordinator._do_heartbeat
    send_sync = rebalance._send_sync_group_request

    async def heartbeat(self: Any) -> bool:
        sent = time.monotonic()
        ok = await do_heartbeat(self)
        member = membership(self.group_id)
        if ok:  # (also "rebalancing": a member until it joins again)
            member.renewed(sent, self._session_timeout_ms / 1000)
            # "rebalancing" asks for a rejoin; one asked for already, the group may be too
            if not self._rejoin_needed_fut.done():
                member.stable(sent, self._rebalance_timeout_ms / 1000)
        elif self.member_id == group_coordinator.JoinGroupRequest.UNKNOWN_MEMBER_ID:
            member.removed = True  # (reset_generation: unknown member, illegal generation)
        return ok

    async def sync(self: Any, request: Any) -> Any:
        sent = time.monotonic()
        assignment = await send_sync(self, request)
        if assignment is not None:
            member = membership(self.group_id)
            member.joined(self._coordinator.member_id)
            member.removed = False  # (a member again, of a new generation)
            member.renewed(sent, self._coordinator._session_timeout_ms / 1000)
            member.stable(sent, self._coordinator._rebalance_timeout_ms / 1000)
        return assignment

    coordinator._do_heartbeat = heartbeat  # type: ignore[method-assign]
    rebalance._send_sync_group_request = sync  # type: ignore[method-assign]
    coordinator.ktel_watched = True  # type: ignore[attr-defined]


watch_group()


class FlowControl(FlowControlEvent):
    def resume(self) -> None:
        """Resume, clearing the stream queues only if flow was suspended (hole 1)."""
        if self.is_active():
            return  # the queues hold only records fetched since the last resume
        super().resume()


class Consumer(faust_aiokafka.Consumer):
    async def _drain_messages(self, fetcher: Any) -> None:
        """Faust's fetch loop (faust-streaming 0.15.3, ``Consumer._drain_messages``), the
        listed topics' records handed over a fetch at a time (``App.take_in_lists``)."""
        app = cast(App, self.app)
        if not app.listed:
            return await super()._drain_messages(fetcher)
        listed, lists = app.listed, app.lists
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = app.topics.acks_enabled_for
        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(AsyncIterator, getmany(timeout=1.0))
                await self.sleep(0)
                if not self.should_stop:
                    taken: list[Any] = []
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if message.topic in listed:
                                taken.append(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    if taken:
                        await self._put_list(lists, taken)
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if app.should_stop:
                return
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _put_list(self, lists: Any, taken: list[Any]) -> None:
        """Put a fetch's records of the listed topics on ``lists``, waiting for room as
        the loop waits for a stream's full queue. A rebalance clears the queue, and with
        it cancels a put that waits for room (mode's ``ThrowableQueue.clear``): that list
        goes with the rest of the queue, read again from the committed offsets, and the
        loop goes on, as it does when Faust's Conductor finds a stream's put cancelled.
        Raised out of the loop, the cancellation would end the fetcher for good, and the
        worker with it, on any rebalance that came while its lists were full."""
        try:
            await self.wait_first(lists.put(taken), self.suspend_flow.wait())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the loop itself is being cancelled

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
        cast(App, self.app).note_backlog(committed)
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
        # Held by the records waiting for the group membership, in the order they were
        # sent, and how many wait (``send_checked``).
        self._in_order = asyncio.Lock()
        self._waiting = 0
        # The app's group's, which watch_group notes too: MEMBERSHIPS never replaces one.
        self.group = self.app.conf.id
        self.member = membership(self.group)

    async def send_checked(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        acked: Callable[[Any], None] | None = None,
    ) -> None:
        """Send a record, while the worker holds its group membership (``Membership``);
        ``acked`` is called with its metadata once Kafka has it."""
        member = self.member
        if not member.current() or self._waiting:
            # In line behind the records waiting for it: one sent meanwhile would go first.
            # A host's changelog records (a list's, a window's) each write its next version,
            # and recovery leaves out a version that comes before the one it follows on
            # from. (Only the wait: a partition whose buffer is full holds up no other's
            # records.)
            self._waiting += 1
            try:
                async with self._in_order:
                    await member.held(self.group)
            finally:
                self._waiting -= 1
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
    # The topics whose records the worker takes in lists (take_in_lists), each with what
    # handles one of its records, and the lists' queue.
    listed: dict[str, Callable[[Any], Awaitable[None]]]
    lists: Any = None
    # The partitions of the listed topics the worker has not yet read up to where they
    # ended when it took them (``note_backlog``), each with the offset its reading started
    # at and that end (None until its first fetch told it).
    backlog: dict[TP, tuple[int, int | None]]
    # What runs once the records of a list are handled, before they are acked: the
    # stages send the changelog records they held back until then
    # (processors/stages.py ``OutputsFirst``).
    before_acks: Callable[[], Awaitable[None]] | None = None
    # A split stage's view of the stages before it (processors/upstream.py; None for the
    # first stage and the fused worker).
    upstream: Upstream | None = None

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return FlowControl(loop=self.loop)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listed = {}
        self.backlog = {}

    def take_in_lists(self, topic: Any, handle: Callable[[Any], Awaitable[None]]) -> None:
        """Subscribe to ``topic`` as an agent would (its records acked and committed), the
        records of each fetch of it and of the other listed topics put in ``lists`` as one
        list, and each given to ``handle`` (a Faust message) by a task of the app
        (``take_listed``)."""
        self.topics.add(topic)
        self.listed[topic.get_topic_name()] = handle
        if self.lists is None:
            # Cleared with the streams' queues on a rebalance; a few fetches held, then
            # the fetch loop waits, as it does for a stream's full queue.
            self.lists = self.FlowControlQueue(maxsize=LISTS_HELD, clear_on_resume=True)
            self.task(self.take_listed)

    async def take_listed(self) -> None:
        """Handle each record of the listed topics, in order, as Faust's stream takes one:
        dropped if fetched before a rebalance (the fetcher reads it again from the
        committed offset), tracked while handled, acked once handled."""
        consumer = self.consumer
        flow = self.flow_control
        while True:
            await self._take_list(await self.lists.get(), self.listed, consumer, flow)

    async def _take_list(
        self, messages: list[Any], handlers: dict[str, Any], consumer: Any, flow: Any
    ) -> None:
        # (its own frame: a list dropped here is unreferenced once this returns, and Faust
        # waits on a rebalance only for the tracked records that are still referenced)
        yielded = time.monotonic()
        # What Faust's stream tells its sensors of each record: when a partition's records
        # were last taken, which its livelock check reads (a partition behind whose records
        # nothing takes is logged as an error), and that a record is done.
        inbound = self.monitor.stream_inbound_time
        message_out = self.sensors.on_message_out
        handled = []
        for message in messages:
            if not flow.is_active() or message.generation_id != self.consumer_generation_id:
                break  # (those handled are acked all the same: a revocation waits for them)
            consumer.track_message(message)
            inbound[message.tp] = time.monotonic()
            await handlers[message.topic](message)
            handled.append(message)
            if self.backlog and message.tp in self.backlog:
                self._read(message.tp, message.offset)
            if time.monotonic() - yielded > YIELD_S:
                # The loop's other work (the windows, the producer's sender) between records
                # of a long list; a stream would have let it run after each.
                await asyncio.sleep(0)
                yielded = time.monotonic()
        # Acked (so committed) only once what they made is on its way, all of it: the
        # stages' changelog records go last, one wait for the list's outputs before them.
        if handled and self.before_acks is not None:
            await self.before_acks()
        for message in handled:
            consumer.ack(message)
            message_out(message.tp, message.offset, message)

    def note_backlog(self, committed: Mapping[TP, int]) -> None:
        """Note the partitions of the listed topics (those ``committed`` names, where the
        worker was just sought to) as being read. Where each ends is what the first fetch
        of it after the seek tells (aiokafka keeps each partition's high watermark from
        its fetches), so nothing is asked of Kafka here: the seek runs under Faust's
        recovery timeout, and one partition without a leader holds up no other."""
        self.backlog = {
            tp: (offset or 0, None) for tp, offset in committed.items() if tp.topic in self.listed
        }

    def _read(self, tp: TP, offset: int | None) -> None:
        """The worker handled ``tp``'s record at ``offset`` (None: none, the partition's
        backlog is looked at): it leaves ``backlog`` once read up to its end."""
        start, end = self.backlog[tp]
        if end is None:
            try:
                end = self.consumer.highwater(tp)  # (None until its first fetch)
            except (AssertionError, AttributeError):
                # (aiokafka's, for a partition no longer assigned, or whose assignment was
                # replaced meanwhile: the next seek notes it anew)
                return
            if end is None:
                return
            self.backlog[tp] = (start, end)
            if offset is None and end <= start:
                del self.backlog[tp]  # (nothing to read past where it started)
                return
        if offset is not None and offset + 1 >= end:
            del self.backlog[tp]

    def reading(self, topic: str) -> set[int]:
        """The partitions of ``topic`` whose backlog (``backlog``) the worker is still reading."""
        for tp in [tp for tp in self.backlog if tp.topic == topic]:
            self._read(tp, None)
        return {tp.partition for tp in self.backlog if tp.topic == topic}

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)
