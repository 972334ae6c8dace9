"""The two rebalance holes processors/faust_app.py closes in Faust, how the worker takes
the records it is handed in lists, and its producer's check before a commit.

The SIGKILL test on the real broker (tests/integration/test_processing_stages.py)
is what found them; these pin down each fix on its own."""

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from faust.types import TP

from processors.faust_app import LISTS_HELD, App, Consumer, FlowControl


def unstarted_consumer(app: App) -> Consumer:
    """The app's consumer, which the test never starts: the event loop Faust made for its
    fetching thread is closed here, as the thread's stop would close it."""
    consumer = app.consumer
    assert isinstance(consumer, Consumer)
    consumer._thread.thread_loop.close()
    return consumer


def test_flow_control_clears_the_queues_only_when_it_resumes_from_suspended():
    async def run():
        app = App("ktel-test", broker="kafka://127.0.0.1:1")
        flow = app.flow_control  # suspended, as Faust's starts
        assert isinstance(flow, FlowControl)
        queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)  # as Faust makes a stream's
        queue.put_nowait("fetched before the rebalance")
        flow.resume()
        assert queue.empty()  # stale records go: they are fetched again from the committed offset
        queue.put_nowait("fetched after the seek")
        flow.resume()  # Faust's second resume at the end of a table recovery
        assert queue.qsize() == 1  # Faust's own FlowControlEvent drops this record for good
        flow.suspend()
        flow.resume()
        assert queue.empty()

    asyncio.run(run())


def test_partitions_without_a_committed_offset_are_sought_to_their_beginning():
    app = App("ktel-test", broker="kafka://127.0.0.1:1")
    changelog = app.Table("state", default=dict).changelog_topic.get_topic_name()
    app.topics.add(app.topic("ktel.raw"))  # as an agent subscribes at start
    asyncio.run(app.topics._update_indices())  # what the worker then does: ktel.raw is acked
    consumer = unstarted_consumer(app)
    committed = {
        TopicPartition("ktel.raw", 0): 17,
        TopicPartition("ktel.raw", 1): None,  # nothing committed yet
        TopicPartition("ktel.raw", 2): 0,  # aiokafka does not seek to 0 either
        TopicPartition(changelog, 1): None,  # recovery reads changelogs from its own offsets
        TopicPartition("ktel-test-__assignor-__leader", 0): None,  # Faust's own, never committed
    }
    sought: list[TopicPartition] = []

    class Thread:
        async def seek_to_committed(self):
            return committed

        async def seek_to_beginning(self, *tps):
            sought.extend(tps)
            return True

    consumer._thread = Thread()
    assert asyncio.run(consumer.seek_to_committed()) == committed
    assert sought == [TopicPartition("ktel.raw", 1), TopicPartition("ktel.raw", 2)]


class Tracking:
    """What ``App._take_list`` asks of Faust's consumer, doing nothing."""

    def track_message(self, msg):
        pass

    def ack(self, msg):
        pass


async def handled(app: App, tp: TopicPartition, *offsets: int) -> None:
    """Have the worker take and handle ``tp``'s records at ``offsets``."""

    async def handle(msg):
        pass

    msgs = [SimpleNamespace(tp=tp, topic=tp.topic, offset=o, generation_id=0) for o in offsets]
    await app._take_list(msgs, {tp.topic: handle}, Tracking(), app.flow_control)


def backlog_app() -> tuple[App, Consumer]:
    app = App("ktel-test", broker="kafka://127.0.0.1:1")
    app.take_in_lists(app.topic("src"), lambda msg: None)
    return app, app.consumer


def test_each_assignment_notes_the_listed_partitions_as_being_read_until_read_to_their_end():
    """At each seek to the committed offsets (every assignment) the worker notes the
    partitions of its listed topics as being read, until it has handled the record just
    before where its first fetch of each said the partition ended (aiokafka's high
    watermark): until then a host of the partition may have batches still unread
    (processors/stages.py). Nothing is asked of Kafka: a partition not fetched yet (no
    leader) stays being read, and holds up no other."""

    async def run():
        app, _ = backlog_app()
        changelog = app.Table("state", default=dict).changelog_topic.get_topic_name()
        await app.topics._update_indices()
        consumer = unstarted_consumer(app)
        app.flow_control.resume()
        behind, caught_up, fresh, leaderless = (TopicPartition("src", p) for p in range(4))
        committed = {behind: 17, caught_up: 30, fresh: None, leaderless: 5, TopicPartition(changelog, 0): 5}
        highwater: dict[TopicPartition, int | None] = dict.fromkeys(committed)

        class Thread:
            async def seek_to_committed(self):
                return committed

            async def seek_to_beginning(self, *tps):
                return True

            def highwater(self, tp):
                return highwater[tp]

        consumer._thread = Thread()
        await consumer.seek_to_committed()
        assert set(app.backlog) == {behind, caught_up, fresh, leaderless}  # (not the changelog's)
        assert app.reading("src") == {0, 1, 2, 3}  # (nothing fetched yet)
        highwater.update({behind: 20, caught_up: 30, fresh: 41})  # (what the first fetches said)
        assert app.reading("src") == {0, 2, 3}  # (30: nothing to read past the committed offset)
        await handled(app, fresh, 40)
        await handled(app, behind, 17, 18)
        assert app.reading("src") == {0, 3}  # (19 still unread)
        highwater[behind] = 25  # (records since: not of the backlog)
        await handled(app, behind, 19)
        assert app.reading("src") == {3}

    asyncio.run(run())


def checked_producer(monkeypatch) -> tuple[Any, list, list]:
    """The app's producer as the stages send through it, over an aiokafka that queues
    nothing: it, each record's future as aiokafka would fail or resolve it, and what
    ``undelivered`` was called with (the worker would have ended)."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from processors import faust_app

    sent: list = []
    stopped: list = []
    monkeypatch.setattr(faust_app, "undelivered", lambda topic, err: stopped.append((topic, type(err))))

    async def send(self, *record):
        sent.append(asyncio.get_running_loop().create_future())
        return sent[-1]

    async def nothing_queued(self):
        return None

    monkeypatch.setattr(faust_aiokafka.Producer, "send", send)
    monkeypatch.setattr(faust_aiokafka.Producer, "flush", nothing_queued)
    member = faust_app.Membership()
    member.renewed(time.monotonic(), 3600.0)  # (a member of its group)
    monkeypatch.setitem(faust_app.MEMBERSHIPS, "ktel-test", member)
    producer = App("ktel-test", broker="kafka://127.0.0.1:1").producer
    assert isinstance(producer, faust_app.Producer)
    return producer, sent, stopped


class Ended(Exception):
    """Raised, with its line, where the worker would have ended (``ending``)."""


@pytest.fixture
def ending(monkeypatch):
    """processors.faust_app's ``end`` raising ``Ended`` instead of ending the process."""
    from processors import faust_app

    def end(line):
        raise Ended(line)

    monkeypatch.setattr(faust_app, "end", end)


def test_a_record_the_producer_could_not_deliver_stops_the_worker_and_one_it_did_is_acked(monkeypatch):

    async def run():
        producer, sent, stopped = checked_producer(monkeypatch)
        acked: list = []
        for topic in ("ktel.metrics", "ktel.enriched", "ktel.spans"):
            await producer.send_checked(topic, b"k", b"v", acked=acked.append)
        failed, done, cancelled = sent
        failed.set_exception(KafkaTimeoutError())
        done.set_result("metadata")
        cancelled.cancel()
        await asyncio.sleep(0)
        assert stopped == [("ktel.metrics", KafkaTimeoutError)]
        assert acked == ["metadata"]
        assert producer.in_flight == {}

    asyncio.run(run())


@pytest.mark.usefixtures("ending")
def test_a_worker_past_its_session_sends_nothing_until_a_heartbeat_answers_and_ends_if_removed(monkeypatch):
    """No heartbeat answered for the session timeout (the process was stopped): the group
    may have given the worker's partitions to another one, so what it sends waits for
    the next answer. As a member's, it goes; "unknown member", and the worker ends."""

    from processors import faust_app

    async def run():
        producer, sent, _stopped = checked_producer(monkeypatch)
        member = faust_app.membership("ktel-test")
        member.alive_at = time.monotonic() - member.session_s  # (lapsed)
        waiting = asyncio.ensure_future(producer.send_checked("ktel.metrics", b"k", b"v"))
        await asyncio.sleep(5 * faust_app.MEMBERSHIP_POLL_S)
        assert not waiting.done() and sent == []
        member.renewed(time.monotonic(), member.session_s)  # a heartbeat answered as a member's
        await waiting
        assert len(sent) == 1
        member.alive_at = time.monotonic() - member.session_s
        waiting = asyncio.ensure_future(producer.send_checked("ktel.metrics", b"k", b"v"))
        await asyncio.sleep(0)
        member.removed = True  # a heartbeat answered "unknown member"
        with pytest.raises(Ended, match="removed this worker"):
            await waiting
        assert len(sent) == 1

    asyncio.run(run())


class Coordinator:
    """What aiokafka's heartbeat and SyncGroup calls use of its group coordinator, the
    broker answering each with ``answer`` (an error code)."""

    def __init__(self, member_id: str):
        self.group_id = "ktel-test"
        self.generation = 1
        self.member_id = member_id
        self.coordinator_id = 0
        self._session_timeout_ms = 6000
        self._rebalance_timeout_ms = 60_000
        self._rejoin_needed_fut: Any = None
        self.answer = 0

    async def _send_req(self, request):
        return SimpleNamespace(error_code=self.answer, member_assignment=b"assignment")

    def reset_generation(self):
        self.generation, self.member_id = -1, ""

    def request_rejoin(self):
        if not self._rejoin_needed_fut.done():
            self._rejoin_needed_fut.set_result(None)


@pytest.mark.usefixtures("ending")
@pytest.mark.parametrize("told_by_heartbeat", [True, False])
def test_a_worker_that_joined_its_group_anew_while_a_send_waited_ends(monkeypatch, told_by_heartbeat):
    """A send waiting past the session (the process was stopped) goes on after a SyncGroup
    under the same member id (a rebalance it stayed in), but not after one under another:
    the worker joined anew, so the group had removed it and another worker may have held
    its partitions when the record was made. That holds whether a heartbeat told it ("unknown
    member", the SyncGroup answered before the waiting send looked again) or something else
    aiokafka heard (an offset commit answered "unknown member"), which the heartbeat's
    wrapper never sees."""
    from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance, GroupCoordinator

    from processors import faust_app

    async def run():
        producer, sent, _stopped = checked_producer(monkeypatch)
        coordinator = Coordinator("member-1")
        rebalance = SimpleNamespace(_coordinator=coordinator, group_id="ktel-test")
        member = faust_app.membership("ktel-test")
        assert await CoordinatorGroupRebalance._send_sync_group_request(rebalance, None) == b"assignment"

        member.alive_at = time.monotonic() - member.session_s  # (lapsed)
        waiting = asyncio.ensure_future(producer.send_checked("ktel.metrics", b"k", b"v"))
        await asyncio.sleep(0)
        assert not waiting.done()
        await CoordinatorGroupRebalance._send_sync_group_request(rebalance, None)  # a rebalance
        await waiting
        assert len(sent) == 1

        member.alive_at = time.monotonic() - member.session_s
        waiting = asyncio.ensure_future(producer.send_checked("ktel.metrics", b"k", b"v"))
        await asyncio.sleep(0)
        assert not waiting.done()
        if told_by_heartbeat:
            coordinator.answer = 25  # unknown member
            await GroupCoordinator._do_heartbeat(coordinator)
            coordinator.answer = 0
        else:
            coordinator.reset_generation()  # (as an offset commit answered so does)
        assert coordinator.member_id == ""
        coordinator.member_id = "member-2"  # joined anew, and synced at once
        await CoordinatorGroupRebalance._send_sync_group_request(rebalance, None)
        with pytest.raises(Ended, match="removed this worker"):
            await waiting
        assert len(sent) == 1

    asyncio.run(run())


def test_a_worker_sends_nothing_past_the_rebalance_timeout_since_its_group_was_last_stable(monkeypatch):
    """A rebalance another worker starts removes, at its rebalance timeout, the members that
    have not joined it again, such as one whose process stopped, whatever its session
    timeout: a heartbeat answered "rebalancing" keeps the session but says nothing of
    when the rebalance began, so past the rebalance timeout since the last answer with the
    group stable (a heartbeat's or a SyncGroup's), what the worker sends waits until it
    joined again. A session of 300 s (ktel's longest) against Faust's 60 s rebalance
    timeout."""
    from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance, GroupCoordinator

    from processors import faust_app

    async def run():
        producer, sent, _stopped = checked_producer(monkeypatch)
        clock = [time.monotonic()]
        start = clock[0]
        monkeypatch.setattr(faust_app, "time", SimpleNamespace(monotonic=lambda: clock[0]))
        coordinator = Coordinator("member-1")
        coordinator._session_timeout_ms = 300_000
        rebalance = SimpleNamespace(_coordinator=coordinator, group_id="ktel-test")
        await CoordinatorGroupRebalance._send_sync_group_request(rebalance, None)
        clock[0] = start + 50
        coordinator.answer = 27  # rebalancing: it began at most 50 s ago
        assert await GroupCoordinator._do_heartbeat(coordinator)
        clock[0] = start + 59
        await producer.send_checked("ktel.metrics", b"k", b"v")
        assert len(sent) == 1
        clock[0] = start + 61  # the rebalance may have ended without this worker
        waiting = asyncio.ensure_future(producer.send_checked("ktel.metrics", b"k", b"v"))
        await asyncio.sleep(0)
        assert not waiting.done() and len(sent) == 1
        coordinator.answer = 0
        await CoordinatorGroupRebalance._send_sync_group_request(rebalance, None)  # joined it
        await waiting
        assert len(sent) == 2
        # A heartbeat answered with the group stable holds it as long again.
        clock[0] = start + 100
        assert await GroupCoordinator._do_heartbeat(coordinator)
        clock[0] = start + 159
        await producer.send_checked("ktel.metrics", b"k", b"v")
        assert len(sent) == 3

    asyncio.run(run())


def test_a_flush_stops_the_worker_on_a_record_that_failed_before_its_callback_ran(monkeypatch):
    """aiokafka fails a batch that expired without a leader after dropping it from its
    queue, so the flush before a commit returns at once; the record's callback has not
    run yet (it runs a loop turn later). The flush itself finds the failure."""
    from aiokafka.errors import NotLeaderForPartitionError

    async def run():
        producer, sent, stopped = checked_producer(monkeypatch)
        await producer.send_checked("ktel.enriched", b"k", b"v")
        await producer.send_checked("ktel.metrics", b"k", b"v")
        acked, failed = sent
        acked.set_result("metadata")
        await asyncio.sleep(0)  # its callback ran: no longer in flight
        await producer.flush()
        assert stopped == []
        failed.set_exception(NotLeaderForPartitionError())
        await producer.flush()  # in the same turn: its callback is still to run
        assert stopped == [("ktel.metrics", NotLeaderForPartitionError)]

    asyncio.run(run())


def test_a_listed_record_is_tracked_while_handled_acked_after_and_dropped_after_a_rebalance():
    """What ``App._take_list`` does with each record of a fetched list, as Faust's stream
    does with each event: records of an older generation, or taken while flow is
    suspended (a rebalance under way), are dropped unacked, with the rest of their list
    (the fetcher reads them again from the committed offset); the others are tracked
    (a rebalance waits for them) and acked only once the list is handled and
    ``App.before_acks`` has run (the stages send their changelog records then)."""

    async def run():
        app = App("ktel-test", broker="kafka://127.0.0.1:1")
        flow = app.flow_control
        flow.resume()
        app.consumer_generation_id = 3
        seen: list[tuple[str, int]] = []

        class Consumer:
            def track_message(self, msg):
                seen.append(("tracked", msg.offset))

            def ack(self, msg):
                seen.append(("acked", msg.offset))

        async def handle(msg):
            seen.append(("handled", msg.offset))
            if msg.offset == 11:
                flow.suspend()  # a rebalance begins while this record is handled

        async def beat(msg):
            seen.append(("beat", msg.offset))

        async def release():
            seen.append(("released", -1))

        app.before_acks = release
        handlers = {"src": handle, "beats": beat}
        tp = TP("src", 0)

        def fetched(*offsets, generation=3, topic="src"):
            return [
                SimpleNamespace(tp=TP(topic, 0), topic=topic, offset=o, generation_id=generation)
                for o in offsets
            ]

        await app._take_list(fetched(10, 11, 12), handlers, Consumer(), flow)
        # 11 was handled whole and is acked; 12 is left for the fetcher to read again.
        handled = [(step, o) for o in (10, 11) for step in ("tracked", "handled")]
        assert seen == [*handled, ("released", -1), ("acked", 10), ("acked", 11)]
        # Faust's livelock check sees that the partition's records are being taken.
        assert tp in app.monitor.stream_inbound_time
        seen.clear()
        flow.resume()
        await app._take_list(fetched(12, 13, generation=2), handlers, Consumer(), flow)
        # Fetched before the rebalance: the new generation reads them again (none to release).
        assert seen == []
        # Each listed topic's records go to its own handler, in the list's order.
        await app._take_list(fetched(14) + fetched(7, topic="beats"), handlers, Consumer(), flow)
        assert [s for s in seen if s[0] in ("handled", "beat")] == [("handled", 14), ("beat", 7)]

    asyncio.run(run())


def test_a_rebalance_while_the_fetch_loop_waits_for_room_drops_the_list_and_the_loop_goes_on():
    """The fetch loop (``Consumer._drain_messages``) with ``App.lists`` full, as under load:
    a rebalance clears the queue, which cancels the loop's waiting put. The list goes
    (its records are read again from the committed offsets) and the loop keeps fetching;
    only the loop's own cancellation, or its fetcher stopping, ends it."""

    async def run():
        app = App("ktel-test", broker="kafka://127.0.0.1:1")
        app.listed = {"src": None}
        app.lists = app.FlowControlQueue(maxsize=LISTS_HELD, clear_on_resume=True)
        consumer = unstarted_consumer(app)
        app.flow_control.resume()
        for i in range(LISTS_HELD):
            app.lists.put_nowait([f"held {i}"])
        tp = TP("src", 0)
        fetches = 0

        async def getmany(timeout):
            nonlocal fetches
            fetches += 1
            if fetches == 1:
                yield tp, SimpleNamespace(topic="src", offset=5, generation_id=0)
            else:
                await asyncio.sleep(0.01)  # nothing more to fetch

        consumer.getmany = getmany
        fetcher = SimpleNamespace(_stopped=asyncio.Event())
        loop_task = asyncio.ensure_future(consumer._drain_messages(fetcher))
        await asyncio.sleep(0.05)
        assert not loop_task.done() and app.lists.full()  # waiting for room
        # What the app does when partitions are revoked (faust-streaming 0.15.3,
        # App._on_partitions_revoked).
        app.rebalancing = True
        consumer.stop_flow()
        app.flow_control.suspend()
        app.flow_control.clear()
        await asyncio.sleep(0.05)
        assert not loop_task.done(), loop_task  # still fetching
        assert app.lists.qsize() == 0 and fetches > 1
        fetcher._stopped.set()
        await asyncio.wait_for(loop_task, 5)  # its fetcher stopped: it ends, without an error

        # Its own cancellation, while it waits for room, still ends it.
        for i in range(LISTS_HELD):
            app.lists.put_nowait([f"held {i}"])
        fetches = 0
        fetcher._stopped.clear()
        consumer.resume_flow()
        loop_task = asyncio.ensure_future(consumer._drain_messages(fetcher))
        await asyncio.sleep(0.05)
        assert not loop_task.done() and fetches == 1
        loop_task.cancel()
        await asyncio.wait([loop_task], timeout=5)
        assert loop_task.cancelled()

    asyncio.run(run())


def test_records_that_wait_for_the_membership_go_in_the_order_they_were_sent(monkeypatch):
    """A host's batch and its heartbeat are taken concurrently, and each writes the next
    version of the host's changelog record. One that waited for the membership went out
    after one sent once the membership was back, before it was polled again: the
    changelog had the host's version 6 before its 5, and recovery left out 6 and every
    delta after it."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from processors import faust_app

    async def run():
        producer, _sent, _stopped = checked_producer(monkeypatch)
        order: list[bytes] = []

        async def send(self, topic, key, value, *rest):
            order.append(value)
            return asyncio.get_running_loop().create_future()

        monkeypatch.setattr(faust_aiokafka.Producer, "send", send)
        member = faust_app.membership("ktel-test")
        member.alive_at = time.monotonic() - member.session_s  # (lapsed)
        first = asyncio.ensure_future(producer.send_checked("host-state-changelog", b"k", b"v5"))
        await asyncio.sleep(0)
        member.renewed(time.monotonic(), member.session_s)  # a heartbeat answered as a member's
        await producer.send_checked("host-state-changelog", b"k", b"v6")
        await first
        assert order == [b"v5", b"v6"]

    asyncio.run(run())
