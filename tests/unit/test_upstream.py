"""Which partitions a split stage holds back from forgetting, from Kafka's answers about the
stages before it (processors/upstream.py). The answers are given here as Kafka gives them;
tests/integration/test_processing_stages.py runs the split stages with dedupe down."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY

from processors import upstream
from processors.stages import SOURCE, SPLIT_ORDER
from processors.upstream import Upstream, behind, check_every, inputs_up_to

INPUTS = {"ktel-dedupe": "ktel.raw", "ktel-enrich": "ktel.deduped"}


def tp(topic: str, p: int) -> TopicPartition:
    return TopicPartition(topic, p)


def ends(raw: list[int], deduped: list[int]) -> dict[TopicPartition, int]:
    return {
        **{tp("ktel.raw", p): e for p, e in enumerate(raw)},
        **{tp("ktel.deduped", p): e for p, e in enumerate(deduped)},
    }


def test_a_partition_is_behind_while_a_group_has_not_committed_what_it_held_a_check_before():
    committed = {
        "ktel-dedupe": {tp("ktel.raw", 0): 10, tp("ktel.raw", 1): 7},
        "ktel-enrich": {tp("ktel.deduped", 0): 5, tp("ktel.deduped", 1): 9},
    }
    # raw[1] held 10 a check ago, dedupe committed 7; deduped[0] held 6, enrich committed 5.
    assert behind(ends([10, 10], [6, 9]), committed, INPUTS) == {0, 1}
    assert behind(ends([10, 7], [5, 9]), committed, INPUTS) == set()


def test_a_partition_a_group_never_committed_on_is_behind_if_it_held_records():
    assert behind(ends([0, 3], [0, 0]), {}, INPUTS) == {1}


def test_records_come_since_the_check_before_do_not_hold_a_partition():
    """A busy partition always has some: its hosts would never be forgotten."""
    up = Upstream("enrich", INPUTS, 2, 3.0)
    committed = {"ktel-dedupe": {tp("ktel.raw", 0): 100}, "ktel-enrich": {tp("ktel.deduped", 0): 100}}
    for _ in range(4):  # (past the start's hold)
        up.checked(committed, ends([100, 0], [100, 0]))
    assert up.held() == set()
    up.checked(committed, ends([180, 0], [140, 0]))  # (80 new records: not yet behind)
    assert up.held() == set()
    up.checked(committed, ends([260, 0], [140, 0]))  # (dedupe stopped: it commits no more)
    assert up.held() == {0}


def test_everything_is_held_from_a_start_and_a_check_not_answered_until_the_stages_are_known():
    """Two checks tell where records wait; as many again as the groups asked, where the
    records that were on their way then have gone."""
    up = Upstream("enrich", INPUTS, 3, 3.0)
    committed = {"ktel-dedupe": {}, "ktel-enrich": {}}
    for _ in range(2):
        assert up.held() == {0, 1, 2}
        for _ in range(3):  # (the first answered check, and the two groups' checks after)
            up.checked(committed, ends([0, 0, 0], [0, 0, 0]))
            assert up.held() == {0, 1, 2}
        up.checked(committed, ends([0, 0, 0], [0, 0, 0]))
        assert up.held() == set()
        up.unknown()


def test_each_split_stage_asks_about_the_stages_up_to_itself():
    def group(s: str) -> str:
        return f"ktel-{s}"

    def topic(s: str) -> str:
        return f"ktel.{SOURCE[s]}"

    assert inputs_up_to("aggregate", SPLIT_ORDER, group, topic) == {
        "ktel-dedupe": "ktel.raw",
        "ktel-enrich": "ktel.deduped",
        "ktel-sample": "ktel.enriched",
        "ktel-aggregate": "ktel.sampled",
    }
    assert inputs_up_to("enrich", SPLIT_ORDER, group, topic) == {
        "ktel-dedupe": "ktel.raw",
        "ktel-enrich": "ktel.deduped",
    }


def test_checks_come_a_quarter_of_the_ttl_apart_within_bounds():
    assert check_every(12) == 5.0
    assert check_every(40) == 10.0
    assert check_every(600) == 15.0
    assert check_every(2) == 5.0


CHAIN = {
    "ktel-dedupe": "ktel.raw",
    "ktel-enrich": "ktel.deduped",
    "ktel-sample": "ktel.enriched",
    "ktel-aggregate": "ktel.sampled",
}


def offsets(*at: int) -> dict[TopicPartition, int]:
    """Partition 0 of each of CHAIN's topics, at ``at``."""
    return {tp(t, 0): o for t, o in zip(CHAIN.values(), at, strict=True)}


def commits(*at: int) -> dict[str, dict[TopicPartition, int]]:
    return {g: {tp(t, 0): o} for (g, t), o in zip(CHAIN.items(), at, strict=True)}


def test_a_backlog_passed_on_between_two_checks_holds_its_partition_until_through_every_stage():
    """dedupe back from an outage passes its backlog on within one check; none of the
    checks after finds it waiting in one input at two checks in a row while it moves on a
    stage a check, yet it is still on its way to this stage."""
    up = Upstream("aggregate", CHAIN, 1, 5.0)
    up.checked(commits(10, 10, 10, 10), offsets(10, 10, 10, 10))
    up.checked(commits(10, 10, 10, 10), offsets(15, 10, 10, 10))  # (dedupe down)
    up.checked(commits(10, 10, 10, 10), offsets(20, 10, 10, 10))
    assert up.held() == {0}
    up.checked(commits(20, 10, 10, 10), offsets(20, 20, 10, 10))  # dedupe back: through it
    assert up.held() == {0}
    up.checked(commits(20, 20, 10, 10), offsets(20, 20, 20, 10))  # through enrich
    assert up.held() == {0}
    up.checked(commits(20, 20, 20, 10), offsets(20, 20, 20, 20))  # through sample
    assert up.held() == {0}
    up.checked(commits(20, 20, 20, 20), offsets(20, 20, 20, 20))  # through this stage
    assert up.held() == {0}  # (as many checks after the last found behind as stages asked)
    assert held_gauge("aggregate") == 1
    up.checked(commits(20, 20, 20, 20), offsets(20, 20, 20, 20))
    assert up.held() == set()
    assert held_gauge("aggregate") == 0


def held_gauge(stage: str) -> float | None:
    return REGISTRY.get_sample_value("ktel_processor_partitions_held_upstream", {"stage": stage})


def clients(admin_start: object) -> tuple[mock.MagicMock, mock.MagicMock]:
    admin, consumer = mock.MagicMock(), mock.MagicMock()
    admin.start = mock.AsyncMock(side_effect=admin_start)
    admin.close = mock.AsyncMock()
    admin.list_consumer_group_offsets = mock.AsyncMock(return_value={})
    consumer.start, consumer.stop = mock.AsyncMock(), mock.AsyncMock()
    consumer.end_offsets = mock.AsyncMock(return_value={})
    return admin, consumer


async def test_an_admin_that_cannot_connect_at_first_is_retried_not_the_workers_end():
    admin, consumer = clients([KafkaConnectionError("no broker"), None])
    up = Upstream("enrich", INPUTS, 1, 0.01)
    stops = iter([False] * 4 + [True])
    with (
        mock.patch.object(upstream, "AIOKafkaConsumer", return_value=consumer),
        mock.patch.object(upstream, "AIOKafkaAdminClient", return_value=admin),
        mock.patch("ktel.retry.Backoff.delays", lambda self: iter([0.0] * 10)),
    ):
        await up.follow("127.0.0.1:9", lambda: next(stops, True), asyncio.sleep)
    assert admin.start.await_count == 2
    assert up.held() == set()  # (four checks answered: two, and one for each group)
    admin.close.assert_awaited()
    consumer.stop.assert_awaited()


async def test_a_worker_stopping_while_the_admin_starts_closes_both_clients():
    admin, consumer = clients(asyncio.CancelledError())
    with (
        mock.patch.object(upstream, "AIOKafkaConsumer", return_value=consumer),
        mock.patch.object(upstream, "AIOKafkaAdminClient", return_value=admin),
        pytest.raises(asyncio.CancelledError),
    ):
        await Upstream("enrich", INPUTS, 1, 0.01).follow("127.0.0.1:9", lambda: False, asyncio.sleep)
    admin.close.assert_awaited()
    consumer.stop.assert_awaited()


def test_a_start_holds_every_partition_as_one_found_behind():
    """What the stages held when the worker started is not known: a backlog a stage before
    passes on between the first two checks is still on its way through the others."""
    up = Upstream("aggregate", CHAIN, 1, 5.0)
    up.checked(commits(10, 10, 10, 10), offsets(20, 10, 10, 10))  # (dedupe down, at the start)
    up.checked(commits(20, 10, 10, 10), offsets(20, 20, 10, 10))  # dedupe back: through it
    assert up.held() == {0}
    for _ in range(3):
        up.checked(commits(20, 20, 20, 20), offsets(20, 20, 20, 20))
    assert up.held() == {0}
    up.checked(commits(20, 20, 20, 20), offsets(20, 20, 20, 20))
    assert up.held() == set()


def test_a_group_that_committed_nothing_on_an_input_holding_records_is_named():
    """Kafka answers a principal that may not read a group's offsets with none, which
    holds its partitions for good: the worker logs which group."""
    up = Upstream("enrich", INPUTS, 2, 5.0)
    committed = {"ktel-dedupe": {}, "ktel-enrich": {tp("ktel.deduped", 0): 3}}
    assert up.silent_groups(committed, ends([0, 4], [3, 0])) == ["ktel-dedupe"]
    assert up.silent_groups(committed, ends([0, 0], [3, 0])) == []
