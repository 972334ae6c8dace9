"""Which partitions a split stage holds back from forgetting, from Kafka's answers about the
stages before it (processors/upstream.py). The answers are given here as Kafka gives them;
tests/integration/test_processing_stages.py runs the split stages with dedupe down."""

from __future__ import annotations

from aiokafka import TopicPartition

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
    up = Upstream(INPUTS, 2, 3.0)
    committed = {"ktel-dedupe": {tp("ktel.raw", 0): 100}, "ktel-enrich": {tp("ktel.deduped", 0): 100}}
    up.checked(committed, ends([100, 0], [100, 0]))
    up.checked(committed, ends([180, 0], [140, 0]))  # (80 new records: not yet behind)
    assert up.held() == set()
    up.checked(committed, ends([260, 0], [140, 0]))  # (dedupe stopped: it commits no more)
    assert up.held() == {0}


def test_everything_is_held_until_two_checks_answered_and_after_one_that_did_not():
    up = Upstream(INPUTS, 3, 3.0)
    committed = {"ktel-dedupe": {}, "ktel-enrich": {}}
    assert up.held() == {0, 1, 2}
    up.checked(committed, ends([0, 0, 0], [0, 0, 0]))
    assert up.held() == {0, 1, 2}
    up.checked(committed, ends([0, 0, 0], [0, 0, 0]))
    assert up.held() == set()
    up.unknown()
    assert up.held() == {0, 1, 2}
    up.checked(committed, ends([0, 0, 0], [0, 0, 0]))
    assert up.held() == {0, 1, 2}


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
    assert check_every(12) == 3.0
    assert check_every(40) == 10.0
    assert check_every(600) == 15.0
    assert check_every(2) == 3.0
