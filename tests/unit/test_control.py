"""The agent's control follower (edge_agent/control.py) without Kafka: bounds,
durations, acknowledgements and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging

import pytest
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord, OffsetAndTimestamp
from prometheus_client import REGISTRY

from edge_agent import control as control_mod
from edge_agent.control import MAX_PENDING_ACKS, Bounds, Control, now_ms
from ktel import logs
from ktel.config import AgentConfig
from ktel.schema import U63
from ktel.wire import ControlCommand, decode_heartbeat, encode_command, encode_heartbeat
from ktel.wire.codec import MAX_RECORD_BYTES

HOST = "h1"
BOUNDS = Bounds(max_sample_every=1000, max_ttl_ms=3_600_000, max_id_chars=64)
T0 = 1_764_000_000_000  # ms


def make(tmp_path, bounds: Bounds = BOUNDS) -> tuple[Control, list[tuple[str, int]]]:
    applied: list[tuple[str, int]] = []
    ctl = Control(HOST, {"file_created": 2}, lambda p, n: applied.append((p, n)), bounds, tmp_path)
    return ctl, applied


def cmd(
    cmd_id: str = "c1",
    target: str = HOST,
    probe: str = "file_created",
    every: int = 10,
    until_ms: int = T0 + 60_000,
    ttl_ms: int | None = 60_000,
    restore: bool = False,
) -> ControlCommand:
    return ControlCommand(cmd_id, target, probe, every, until_ms, ttl_ms, restore)


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("ktel_agent_commands_refused_total", {"reason": reason}) or 0.0


OUT_OF_BOUNDS = [
    ("sample_every", cmd(every=U63)),  # the wire's largest: once a u32 knob of 0, keeping all
    ("sample_every", cmd(every=1001)),
    ("probe", cmd(probe="no_such_probe")),
    ("probe", cmd(probe="\x00" * 256)),  # (its repr ten times as long)
    ("ttl", cmd(ttl_ms=3_600_001)),
    ("ttl", cmd(until_ms=1 << 62, ttl_ms=None)),  # an old-form deadline far away
    ("ttl", cmd(ttl_ms=0)),
    ("ttl", cmd(until_ms=T0 - 1, ttl_ms=None)),  # an old-form deadline before its record
    ("id", cmd(cmd_id="x" * 65)),
]


@pytest.mark.parametrize(("reason", "command"), OUT_OF_BOUNDS)
def test_a_command_out_of_bounds_is_refused_counted_and_reported(tmp_path, reason, command):
    ctl, applied = make(tmp_path)
    before = refused(reason)
    assert not ctl.handle(command, sent_ms=T0, now=T0)
    assert applied == [] and ctl.sample_every("file_created") == 2
    assert refused(reason) == before + 1
    assert ctl.counts == {"commands_applied": 0, "commands_refused": 1}
    [(cmd_id, why)] = ctl.take_refusals()
    assert cmd_id == command.id[:64] and why
    assert ctl.take_acks() == []
    # The heartbeat that reports it decodes (one that did not would be dead-lettered whole).
    hb = {
        "ts": 1,
        "host": {"host.id": HOST},
        "probes": {},
        "counters": {},
        "refused_commands": [[cmd_id, why]],
    }
    assert decode_heartbeat(encode_heartbeat(hb))["refused_commands"] == [[cmd_id, why]]


def test_the_largest_command_in_bounds_is_applied(tmp_path):
    ctl, applied = make(tmp_path)
    assert ctl.handle(cmd(cmd_id="x" * 64, every=1000, ttl_ms=3_600_000), sent_ms=T0, now=T0)
    assert applied == [("file_created", 1000)]
    assert ctl.take_acks() == ["x" * 64] and ctl.take_refusals() == []


def test_another_hosts_command_is_ignored_not_refused(tmp_path):
    ctl, applied = make(tmp_path)
    assert not ctl.handle(cmd(target="h2", every=U63), sent_ms=T0, now=T0)
    assert applied == [] and ctl.counts["commands_refused"] == 0 and ctl.take_refusals() == []
    assert ctl.handle(cmd(target="*"), sent_ms=T0, now=T0)


def test_a_command_holds_its_duration_from_when_the_agent_applies_it(tmp_path):
    ctl, applied = make(tmp_path)
    # The sender's clock is a day ahead: until_ms and the record time say so, the duration does not.
    day = 86_400_000
    assert ctl.handle(cmd(until_ms=T0 + day + 60_000), sent_ms=T0 + day, now=T0)
    ctl.expire(now=T0 + 59_999)
    assert ctl.sample_every("file_created") == 10
    ctl.expire(now=T0 + 60_000)
    assert ctl.sample_every("file_created") == 2  # the configured rate is back
    assert applied == [("file_created", 10), ("file_created", 2)]


def test_the_old_form_holds_until_ms_minus_its_record_time(tmp_path):
    ctl, _ = make(tmp_path)
    # Sender an hour behind: until_ms is in the agent's past, yet 30 s remain by the sender's clock.
    hour = 3_600_000
    assert ctl.handle(cmd(until_ms=T0 - hour + 30_000, ttl_ms=None), sent_ms=T0 - hour, now=T0)
    assert ctl.command("file_created").deadline_ms == T0 + 30_000


def test_acknowledgements_stay_bounded_and_fit_a_heartbeat(tmp_path):
    ctl, _ = make(tmp_path, Bounds(1000, 3_600_000, 512))
    dropped = REGISTRY.get_sample_value("ktel_agent_command_acks_dropped_total") or 0.0
    for i in range(MAX_PENDING_ACKS + 10):
        ctl.handle(cmd(cmd_id=f"{i:0512d}", every=1 << 40), sent_ms=T0, now=T0)
    refusals = ctl.take_refusals()
    assert len(refusals) == MAX_PENDING_ACKS and refusals[-1][0] == f"{MAX_PENDING_ACKS + 9:0512d}"
    ctl.handle(cmd(cmd_id="new", every=1 << 40), sent_ms=T0, now=T0)
    ctl.unack([], refusals)  # that heartbeat was not sent: still bounded, the oldest go
    again = ctl.take_refusals()
    assert len(again) == MAX_PENDING_ACKS and again[-1][0] == "new"
    assert (REGISTRY.get_sample_value("ktel_agent_command_acks_dropped_total") or 0.0) == dropped + 11
    hb = {"ts": 1, "host": {"host.id": HOST}, "probes": {}, "counters": {}, "refused_commands": again}
    assert len(encode_heartbeat(hb)) < MAX_RECORD_BYTES // 8
    assert decode_heartbeat(encode_heartbeat(hb))["refused_commands"] == again


def test_a_command_in_force_survives_a_restart_neither_ended_nor_extended(tmp_path):
    now = now_ms()
    first, _ = make(tmp_path)
    assert first.handle(cmd(ttl_ms=60_000), sent_ms=now, now=now)
    assert first.take_acks() == ["c1"]
    first.save()  # (after each fetch)

    restarted, applied = make(tmp_path)
    assert restarted.sample_every("file_created") == 10  # before Kafka is reached
    assert restarted.command("file_created").deadline_ms == now + 60_000
    # Read back from ktel.control later: the deadline stands, and it is not acknowledged again.
    assert restarted.handle(cmd(ttl_ms=60_000), sent_ms=now, now=now + 20_000, replayed=True)
    assert restarted.command("file_created").deadline_ms == now + 60_000
    assert restarted.take_acks() == [] and restarted.counts["commands_applied"] == 0


def test_a_command_sent_while_the_agent_was_down_holds_at_most_its_duration(tmp_path):
    ctl, _ = make(tmp_path)
    now = now_ms()
    # Sent 20 s before the agent read it back: 40 s of its minute are left.
    assert ctl.handle(cmd(ttl_ms=60_000), sent_ms=now - 20_000, now=now, replayed=True)
    assert ctl.command("file_created").deadline_ms == now + 40_000
    # From a sender whose clock is ahead: never more than the full duration.
    assert ctl.handle(cmd(cmd_id="c2", ttl_ms=60_000), sent_ms=now + 86_400_000, now=now, replayed=True)
    assert ctl.command("file_created").deadline_ms == now + 60_000
    # Over before the agent came back.
    assert not ctl.handle(cmd(cmd_id="c3", ttl_ms=60_000), sent_ms=now - 60_000, now=now, replayed=True)


def test_what_a_restart_re_applies_is_bounded_like_a_command(tmp_path):
    now = now_ms()
    first, _ = make(tmp_path, Bounds(1000, 3_600_000, 64))
    first.handle(cmd(every=1000), sent_ms=now, now=now)
    first.save()
    lowered, _ = make(tmp_path, Bounds(100, 3_600_000, 64))
    assert lowered.sample_every("file_created") == 2


def test_a_damaged_state_file_is_ignored(tmp_path):
    (tmp_path / control_mod.STATE_FILE).write_text("{not json")
    ctl, _ = make(tmp_path)
    assert ctl.overrides == {}


def test_bounds_come_from_the_agent_config(tmp_path):
    acfg = AgentConfig(host_id=HOST, state_dir=tmp_path, control_max_ttl_seconds=60)
    assert Bounds.of(acfg) == Bounds(1_000_000, 60_000, 512)
    with pytest.raises(ValueError, match="control_max_sample_every"):
        AgentConfig(host_id=HOST, control_max_sample_every=1 << 32)


def test_a_fetchs_commands_are_saved_in_one_write(tmp_path, monkeypatch):
    """Each write takes the whole state file: one per command held the agent's event loop
    for seconds under a flood of them."""
    ctl, _ = make(tmp_path)
    writes = []
    real = control_mod.os.replace
    monkeypatch.setattr(control_mod.os, "replace", lambda a, b: (writes.append(b), real(a, b)))
    now = now_ms()
    for i in range(500):
        assert ctl.handle(cmd(cmd_id=f"c{i}", ttl_ms=60_000), sent_ms=now, now=now)
    assert writes == []
    ctl.save()
    ctl.save()  # (nothing new since)
    assert len(writes) == 1
    assert make(tmp_path)[0].command("file_created").id == "c499"


def test_a_command_taken_over_stays_over_after_a_restart(tmp_path):
    """A (1 in 7 for 50 min), then B (1 in 1 for a minute) for the same probe: once B is
    over the configured rate comes back, and a restart must not bring A back."""
    ctl, applied = make(tmp_path)
    now = now_ms() - 70_000  # (the restart below is on the real clock: B is over by then)
    assert ctl.handle(cmd(cmd_id="A", every=7, ttl_ms=3_000_000), sent_ms=now, now=now)
    assert ctl.handle(cmd(cmd_id="B", every=1, ttl_ms=60_000), sent_ms=now, now=now + 1000)
    ctl.expire(now + 61_001)
    assert ctl.sample_every("file_created") == 2
    ctl.save(now + 61_001)
    restarted, _ = make(tmp_path)
    assert restarted.sample_every("file_created") == 2
    # Read back from Kafka at the start: both are known, neither applies again.
    later = now + 62_000
    assert not restarted.handle(cmd(cmd_id="A", every=7, ttl_ms=3_000_000), now, now=later, replayed=True)
    assert not restarted.handle(cmd(cmd_id="B", every=1, ttl_ms=60_000), now, now=later, replayed=True)
    assert restarted.sample_every("file_created") == 2


def test_a_command_over_is_not_applied_again_by_a_restart_whatever_its_senders_clock(tmp_path):
    """Its sender's clock an hour ahead, a command's record is read back at every start
    for an hour and more (the look-back goes by record times): it must not hold again."""
    ctl, _ = make(tmp_path)
    now, ahead = now_ms() - 17 * 60_000, 3_600_000  # (the restart below: on the real clock)
    assert ctl.handle(cmd(ttl_ms=300_000), sent_ms=now + ahead, now=now)
    ctl.expire(now + 300_001)
    ctl.save(now + 300_001)
    restarted, applied = make(tmp_path)
    later = now + 17 * 60_000
    assert not restarted.handle(cmd(ttl_ms=300_000), sent_ms=now + ahead, now=later, replayed=True)
    assert applied == [] and restarted.sample_every("file_created") == 2


def test_a_command_read_back_over_at_a_start_still_ends_the_one_it_took_over(tmp_path):
    """A (1 in 50 for 5 min), then B (1 in 10 for a minute) for the same probe; the agent
    restarts 90 s after B with neither remembered (its state file lost, or a SIGKILL
    before it was written): read back, A still holds by its record's time and B is over.
    B had ended A when it was sent, so the configured rate comes back, not A's."""
    ctl, applied = make(tmp_path)
    now = now_ms()
    assert ctl.handle(
        cmd(cmd_id="A", every=50, ttl_ms=300_000), sent_ms=now - 100_000, now=now, replayed=True
    )
    assert not ctl.handle(
        cmd(cmd_id="B", every=10, ttl_ms=60_000), sent_ms=now - 90_000, now=now, replayed=True
    )
    assert ctl.command("file_created") is None and ctl.sample_every("file_created") == 2
    assert applied[-1] == ("file_created", 2)


def test_a_command_over_stays_over_after_a_restart_with_the_clock_set_back(tmp_path):
    """A command applied and expired while the node's clock ran 10 minutes ahead; NTP
    steps it back, and the agent restarts: remembered with the time it expired, which is
    in the future again, it held again for those 10 minutes."""
    ctl, _ = make(tmp_path)
    ahead = now_ms() + 600_000
    assert ctl.handle(cmd(every=50, ttl_ms=60_000), sent_ms=ahead, now=ahead)
    ctl.expire(now=ahead + 61_000)
    ctl.save(now=ahead + 61_000)
    assert make(tmp_path)[0].command("file_created") is None


def test_a_known_id_sent_again_with_other_values_changes_nothing(tmp_path):
    ctl, applied = make(tmp_path)
    now = now_ms()
    assert ctl.handle(cmd(cmd_id="A", every=10, ttl_ms=60_000), sent_ms=now, now=now)
    ctl.handle(cmd(cmd_id="A", probe="syscall_latency", every=999, ttl_ms=60_000), sent_ms=now, now=now + 1)
    assert ctl.sample_every("file_created") == 10 and ctl.command("syscall_latency") is None
    assert [n for p, n in applied if p == "syscall_latency"] == []


def test_a_restore_ends_the_override_and_the_configured_rate_comes_back(tmp_path):
    """Not its own rate for another TTL: that is only for agents that predate restores."""
    ctl, applied = make(tmp_path)
    now = now_ms() - 10_000  # (the restart below is on the real clock: after the restore)
    assert ctl.handle(cmd(cmd_id="raise", every=10, ttl_ms=60_000), sent_ms=now, now=now)
    assert ctl.handle(
        cmd(cmd_id="restore", every=5, ttl_ms=60_000, restore=True), sent_ms=now, now=now + 1000
    )
    assert ctl.sample_every("file_created") == 2 and ctl.command("file_created") is None
    assert applied == [("file_created", 10), ("file_created", 2)]
    assert ctl.take_acks() == ["raise", "restore"]
    assert ctl.counts == {"commands_applied": 2, "commands_refused": 0}
    ctl.expire(now + 61_000)
    assert applied == [("file_created", 10), ("file_created", 2)]
    ctl.save(now + 1000)
    # A restart neither brings the raise back nor applies either record again.
    restarted, again = make(tmp_path)
    assert restarted.sample_every("file_created") == 2 and restarted.command("file_created") is None
    assert not restarted.handle(cmd(cmd_id="raise", every=10), sent_ms=now, now=now + 2000, replayed=True)
    assert not restarted.handle(
        cmd(cmd_id="restore", every=5, restore=True), sent_ms=now, now=now + 2000, replayed=True
    )
    assert again == [] and restarted.sample_every("file_created") == 2


def test_a_restore_read_back_after_its_raise_ends_it(tmp_path):
    """The state file lost: both records are judged by their times, in the topic's order."""
    ctl, applied = make(tmp_path)
    now = now_ms()
    assert ctl.handle(cmd(cmd_id="raise", every=10), sent_ms=now - 2000, now=now, replayed=True)
    assert ctl.handle(
        cmd(cmd_id="restore", every=5, restore=True), sent_ms=now - 1000, now=now, replayed=True
    )
    assert applied == [("file_created", 10), ("file_created", 2)]
    assert ctl.command("file_created") is None


def test_a_restore_with_nothing_in_force_is_acknowledged_and_bounded_like_any_command(tmp_path):
    ctl, applied = make(tmp_path)
    assert ctl.handle(cmd(cmd_id="r", every=5, restore=True), sent_ms=T0, now=T0)
    assert applied == [("file_created", 2)] and ctl.take_acks() == ["r"]
    before = refused("probe")
    assert not ctl.handle(cmd(cmd_id="r2", probe="no_such_probe", restore=True), sent_ms=T0, now=T0)
    assert refused("probe") == before + 1
    # Its rate is not this agent's to apply: one past its bound does not refuse it.
    assert ctl.handle(cmd(cmd_id="r3", every=BOUNDS.max_sample_every + 1, restore=True), sent_ms=T0, now=T0)
    assert applied[-1] == ("file_created", 2)


def records(*cmds: ControlCommand, sent_ms: int, first: int = 0) -> list[ConsumerRecord[None, bytes]]:
    """ktel.control's records from offset ``first``, as the follower fetches them."""
    return [
        ConsumerRecord("ktel.control", 0, first + i, sent_ms, 0, None, encode_command(c), None, 0, 0, ())
        for i, c in enumerate(cmds)
    ]


def flood(n: int) -> list[ControlCommand]:
    """``n`` commands applied one after another, each taking over from the last."""
    return [cmd(cmd_id=f"f{i}", probe="syscall_latency", every=3, ttl_ms=600_000) for i in range(n)]


def test_a_restart_after_a_flood_does_not_bring_back_a_raise_its_restore_ended(tmp_path):
    """A raise, more commands than the state file remembers, then a restore of the raise's
    probe: the raise is forgotten, and read back at the start as a command never seen it
    would hold again for the rest of its duration, the restore (remembered, over) not
    ending it."""
    now = now_ms() - 1000
    log = [cmd(cmd_id="raise", every=50, ttl_ms=3_000_000), *flood(control_mod.MAX_REMEMBERED)]
    log.append(cmd(cmd_id="restore", restore=True, ttl_ms=60_000))
    ctl, _ = make(tmp_path)
    ctl.begin(0, 0)
    ctl.judge(records(*log, sent_ms=now))
    ctl.save()
    assert "raise" not in ctl.applied and ctl.sample_every("file_created") == 2

    restarted, applied = make(tmp_path)
    restarted.begin(0, len(log))
    restarted.judge(records(*log, sent_ms=now))
    assert (
        restarted.sample_every("file_created") == 2 and [n for p, n in applied if p == "file_created"] == []
    )
    assert restarted.command("syscall_latency").id == f"f{control_mod.MAX_REMEMBERED - 1}"


def test_a_restart_after_a_flood_does_not_let_a_forgotten_restore_end_a_later_command(tmp_path):
    now = now_ms() - 1000
    log = [cmd(cmd_id="restore", restore=True, ttl_ms=60_000), *flood(control_mod.MAX_REMEMBERED)]
    log.append(cmd(cmd_id="by-hand", every=9, ttl_ms=600_000))
    ctl, _ = make(tmp_path)
    ctl.begin(0, 0)
    ctl.judge(records(*log, sent_ms=now))
    ctl.save()
    assert "restore" not in ctl.applied

    restarted, _ = make(tmp_path)
    restarted.begin(0, len(log))
    restarted.judge(records(*log, sent_ms=now))
    assert restarted.command("file_created").id == "by-hand" and restarted.sample_every("file_created") == 9


def test_a_flood_does_not_forget_a_command_in_force(tmp_path):
    now = now_ms() - 1000
    ctl, _ = make(tmp_path)
    ctl.judge(
        records(cmd(cmd_id="raise", ttl_ms=600_000), *flood(2 * control_mod.MAX_REMEMBERED), sent_ms=now)
    )
    ctl.save()
    assert len(ctl.applied) <= control_mod.MAX_REMEMBERED + 1
    assert make(tmp_path)[0].command("file_created").id == "raise"


def test_records_past_what_was_saved_are_judged_again_at_a_start(tmp_path):
    """Judged after the state file's last write (a SIGKILL before the next): judged again
    by their times; and a topic made again (its end before the offset saved) is read
    whole, as if nothing was saved."""
    now = now_ms() - 1000
    ctl, _ = make(tmp_path)
    ctl.judge(records(cmd(cmd_id="a", probe="syscall_latency", ttl_ms=600_000), sent_ms=now))
    ctl.save()
    ctl.judge(records(cmd(cmd_id="b", ttl_ms=600_000), sent_ms=now, first=1))  # not saved
    assert json.loads((tmp_path / control_mod.STATE_FILE).read_text())["judged_to"] == 0

    restarted, _ = make(tmp_path)
    restarted.begin(0, 2)
    restarted.judge(
        records(
            cmd(cmd_id="a", probe="syscall_latency", ttl_ms=600_000),
            cmd(cmd_id="b", ttl_ms=600_000),
            sent_ms=now,
        )
    )
    assert restarted.command("file_created").id == "b" and restarted.take_acks() == ["b"]

    again, _ = make(tmp_path)
    again.begin(0, 0)  # (ktel.control deleted and made again, empty)
    assert again.judged_to is None
    again.judge(records(cmd(cmd_id="new", ttl_ms=600_000), sent_ms=now_ms()))
    assert again.command("file_created").id == "new"


@pytest.mark.parametrize("judged_to", ["7", -1, 1.5, [3], True])
def test_a_state_file_with_a_bad_offset_is_ignored(tmp_path, judged_to):
    (tmp_path / control_mod.STATE_FILE).write_text(json.dumps({"judged_to": judged_to, "applied": []}))
    assert make(tmp_path)[0].judged_to is None


def test_an_older_agents_state_file_is_taken(tmp_path):
    now = now_ms()
    (tmp_path / control_mod.STATE_FILE).write_text(json.dumps([["c1", "file_created", 10, now + 60_000]]))
    ctl, _ = make(tmp_path)
    assert ctl.sample_every("file_created") == 10 and ctl.judged_to is None


def saved_after(tmp_path, *cmds: ControlCommand) -> None:
    """The state file of an agent that judged ``cmds``, at offsets from 0."""
    ctl, _ = make(tmp_path)
    ctl.judge(records(*cmds, sent_ms=now_ms() - 1000))
    ctl.save()


def test_a_topic_made_again_is_saved_as_not_judged_at_the_next_write(tmp_path):
    """Made again while the agent was down, and nothing for this host judged since: the
    file must not keep the old topic's offset, or a start once the new topic grew past
    it would pass over records no one judged."""
    saved_after(tmp_path, *flood(3))
    ctl, _ = make(tmp_path)
    ctl.begin(0, 1)
    ctl.judge(records(cmd(cmd_id="other", target="h2"), sent_ms=now_ms() - 1000))  # (another host's)
    ctl.save()

    restarted, _ = make(tmp_path)
    restarted.begin(0, 3)  # (grown past the old offset while the agent was down)
    log = [cmd(cmd_id="other", target="h2"), cmd(cmd_id="mine", ttl_ms=600_000), cmd(cmd_id="x", target="h2")]
    restarted.judge(records(*log, sent_ms=now_ms() - 1000))
    assert restarted.command("file_created").id == "mine"


@pytest.mark.parametrize(
    "content",
    [
        '[["c1", "file_created", Infinity, 1]]',  # (json takes it, int() does not: OverflowError)
        '{"judged_to": 3, "applied": [["c1", "file_created", 10, -Infinity]]}',
        "[" * 100_000,  # (RecursionError)
    ],
)
def test_a_state_file_that_does_not_load_is_ignored_not_a_failed_start(tmp_path, content):
    """The agent would fail at every start until the file was removed."""
    (tmp_path / control_mod.STATE_FILE).write_text(content)
    ctl, _ = make(tmp_path)
    assert ctl.overrides == {} and ctl.applied == {} and ctl.judged_to is None


@pytest.mark.parametrize("every", [0, -1])
def test_a_saved_rate_below_one_is_not_applied_again(tmp_path, every):
    """The kernel's knob is a u32 (-1 would sample 1 in 2**32 - 1, each event weighing 1),
    and a heartbeat naming such a rate does not decode: every one would be dead-lettered."""
    now = now_ms()
    row = ["c1", "file_created", every, now + 60_000, now + 60_000]
    (tmp_path / control_mod.STATE_FILE).write_text(json.dumps({"judged_to": 0, "applied": [row]}))
    assert make(tmp_path)[0].sample_every("file_created") == 2


def test_a_saved_id_longer_than_the_bound_is_not_applied_again(tmp_path):
    """No command this agent applies has such an id; the heartbeat names the command in
    force, and one of over 512 characters does not decode: every heartbeat would be
    dead-lettered for as long as the command held."""
    now = now_ms()
    row = ["c" * 600, "file_created", 10, now + 60_000, now + 60_000]
    (tmp_path / control_mod.STATE_FILE).write_text(json.dumps({"judged_to": 0, "applied": [row]}))
    assert make(tmp_path)[0].command("file_created") is None


def test_a_saved_deadline_holds_no_longer_than_the_bound_from_the_start(tmp_path):
    """A clock set back since the file was written (or a deadline edited into it) would
    otherwise keep a rate in force for as long as the file says."""
    now = now_ms()
    far = now + 100 * BOUNDS.max_ttl_ms
    (tmp_path / control_mod.STATE_FILE).write_text(
        json.dumps({"judged_to": 5, "applied": [["c1", "file_created", 10, far, far]]})
    )
    ctl, _ = make(tmp_path)
    assert ctl.sample_every("file_created") == 10
    assert now + BOUNDS.max_ttl_ms <= ctl.command("file_created").deadline_ms <= now_ms() + BOUNDS.max_ttl_ms


class TrickledControl:
    """ktel.control as the follower's consumer sees it (no broker): each fetch brings one
    record, then, once all were fetched, nothing until the follower is cancelled."""

    def __init__(self, recs: list[ConsumerRecord[None, bytes]], per_fetch: int = 1) -> None:
        self.recs = recs
        self.per_fetch = per_fetch
        self.fetched = asyncio.Event()

    def __call__(self, **_settings) -> TrickledControl:
        return self

    async def end_offsets(self, tps):
        return dict.fromkeys(tps, 0)

    async def offsets_for_times(self, times):
        return dict.fromkeys(times)

    def assign(self, tps) -> None:
        pass

    def seek(self, tp, offset) -> None:
        pass

    async def getmany(self, timeout_ms: int):
        if self.recs:
            fetch, self.recs = self.recs[: self.per_fetch], self.recs[self.per_fetch :]
            return {"tp": fetch}
        self.fetched.set()
        await asyncio.sleep(timeout_ms / 1000)
        return {}


def following(ctl: Control, consumer: TrickledControl, monkeypatch) -> asyncio.Future:
    """``ctl`` following ``consumer``, on a clock that does not move (no write comes due)."""
    monkeypatch.setattr(control_mod.time, "monotonic", lambda: 1000.0)

    @contextlib.asynccontextmanager
    async def started(client, kafka, who):
        yield client

    monkeypatch.setattr(control_mod.kafka_client, "started", started)
    monkeypatch.setattr(control_mod, "AIOKafkaConsumer", consumer)
    return asyncio.ensure_future(ctl.follow("127.0.0.1:9"))


async def test_commands_trickling_in_do_not_rewrite_the_state_file_at_every_fetch(tmp_path, monkeypatch):
    """Each write takes the whole file, up to MAX_REMEMBERED commands of ids up to 2 KiB
    (6 MB and 28 ms here): a writer of ktel.control sending a valid command every few ms,
    each in a fetch of its own, held every agent's event loop and disk with writes. The
    file is written at most once every SAVE_INTERVAL_S, and when the follower stops."""
    ctl, _ = make(tmp_path)
    writes = []
    real = control_mod.os.replace
    monkeypatch.setattr(control_mod.os, "replace", lambda a, b: (writes.append(b), real(a, b)))
    now = now_ms()
    consumer = TrickledControl([records(cmd(cmd_id=f"c{i}"), sent_ms=now, first=i)[0] for i in range(20)])
    follower = following(ctl, consumer, monkeypatch)
    await consumer.fetched.wait()
    assert ctl.command("file_created").id == "c19"
    assert len(writes) <= 1
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    # What the follower judged since its last write is written as it stops.
    restarted, _ = make(tmp_path)
    assert restarted.command("file_created").id == "c19" and restarted.judged_to == 19


async def test_a_flood_between_two_writes_keeps_what_is_remembered_bounded(tmp_path, monkeypatch):
    """What a write forgets (the oldest commands past MAX_REMEMBERED) is forgotten as they
    come: a second of fetches between two writes may bring millions of commands."""
    ctl, _ = make(tmp_path)
    now = now_ms()
    flood = [
        records(cmd(cmd_id=f"c{i}"), sent_ms=now, first=i)[0] for i in range(3 * control_mod.MAX_REMEMBERED)
    ]
    consumer = TrickledControl(flood, per_fetch=100)
    follower = following(ctl, consumer, monkeypatch)
    await consumer.fetched.wait()
    assert ctl.command("file_created").id == f"c{len(flood) - 1}"
    assert len(ctl.applied) <= 2 * control_mod.MAX_REMEMBERED
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower


class OutOfReach:
    """ktel.control as the follower's consumer sees it (no broker): ``before``, then, once
    those were fetched, ``after`` instead, the follower's position out of its range (the
    topic made again, or records deleted by retention ahead of it). Out of range, the
    consumer goes to the end, as aiokafka's default does, unless auto_offset_reset is
    "none": the fetch then raises OffsetOutOfRangeError, and ``grown`` are added to the
    topic before the follower can look it up."""

    def __init__(
        self,
        before: list[ConsumerRecord[None, bytes]],
        after: list[ConsumerRecord[None, bytes]],
        grown: list[ConsumerRecord[None, bytes]] | None = None,
    ):
        self.topic, self.after, self.grown = before, after, grown or []
        self.at = 0  # the consumer's position
        self.reset = "latest"
        self.fetched = asyncio.Event()

    def __call__(self, **settings) -> OutOfReach:
        self.reset = settings.get("auto_offset_reset", self.reset)
        return self

    async def beginning_offsets(self, tps):
        return dict.fromkeys(tps, self.topic[0].offset)

    async def end_offsets(self, tps):
        return dict.fromkeys(tps, self.topic[-1].offset + 1)

    async def offsets_for_times(self, times):
        # (every record of these tests is within the look-back)
        return dict.fromkeys(times, OffsetAndTimestamp(self.topic[0].offset, self.topic[0].timestamp))

    async def position(self, tp) -> int:
        return self.at

    def assign(self, tps) -> None:
        pass

    def seek(self, tp, offset) -> None:
        self.at = offset

    async def getmany(self, timeout_ms: int):
        first, end = self.topic[0].offset, self.topic[-1].offset + 1
        if not first <= self.at <= end:
            if self.reset == "none":
                self.topic, self.grown = self.topic + self.grown, []
                raise OffsetOutOfRangeError({"tp": self.at})
            self.at = end
        if fetch := [r for r in self.topic if r.offset >= self.at]:
            self.at = fetch[-1].offset + 1
            return {"tp": fetch}
        if self.after:
            self.topic, self.after = self.after, []
            return {}
        self.fetched.set()
        await asyncio.sleep(timeout_ms / 1000)
        return {}


@pytest.mark.parametrize("first", [0, 5], ids=["made again", "deleted by retention"])
async def test_records_out_of_the_followers_reach_are_read_from_the_look_back(tmp_path, monkeypatch, first):
    """ktel.control made again while the agent follows it, with commands sent to it before
    the agent's next fetch (the agent cut off from Kafka meanwhile), or the records ahead
    of the agent deleted by retention (cut off for longer than the topic keeps them):
    Kafka finds its position out of the topic's range. A consumer that went to the
    topic's end passed over the commands sent meanwhile; they are read from the look-back
    and judged by their times, as at a start, and the state file holds the offset of the
    last one (the old topic's, a start once the new topic grew past it would pass over
    records no one judged)."""
    now = now_ms()
    ctl, _ = make(tmp_path)
    # Sent by a clock a minute behind: read back, a command holds a minute less.
    sent = [cmd(cmd_id="a", probe="syscall_latency", ttl_ms=600_000), cmd(cmd_id="b", ttl_ms=600_000)]
    consumer = OutOfReach(
        records(*flood(3), sent_ms=now - 1000), records(*sent, sent_ms=now - 60_000, first=first)
    )
    follower = following(ctl, consumer, monkeypatch)
    await consumer.fetched.wait()
    assert [getattr(ctl.command(p), "id", None) for p in ("syscall_latency", "file_created")] == ["a", "b"]
    assert ctl.command("file_created").deadline_ms <= now_ms() + 540_000
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert json.loads((tmp_path / control_mod.STATE_FILE).read_text())["judged_to"] == first + 1


async def test_a_topic_made_again_that_grows_past_the_followers_position_after_its_fetch_is_read_whole(
    tmp_path, monkeypatch
):
    """ktel.control made again while the agent follows it, found out of range at a fetch
    (the new topic ended before the agent's position), and grown past that position
    before the agent looked it up (commands sent meanwhile, the broker away for the
    agent). Taken, by its end, for a topic whose records retention deleted, its records
    up to the old topic's last offset judged were passed over, unjudged: the agent tells
    the two apart by the topic's first offset, which retention alone moves past it."""
    now = now_ms()
    ctl, _ = make(tmp_path)
    probes = ["syscall_latency", "file_created", "runq_latency", "tcp_retransmit"]
    sent = [cmd(cmd_id=p, probe=p, ttl_ms=600_000) for p in probes]
    new = records(*sent, sent_ms=now - 1000)
    consumer = OutOfReach(records(*flood(3), sent_ms=now - 1000), new[:1], grown=new[1:])
    follower = following(ctl, consumer, monkeypatch)
    await consumer.fetched.wait()
    assert [getattr(ctl.command(p), "id", None) for p in probes] == probes
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert json.loads((tmp_path / control_mod.STATE_FILE).read_text())["judged_to"] == len(probes) - 1


def test_a_clock_set_back_while_a_command_holds_stretches_it_no_longer_than_the_bound(tmp_path):
    """Deadlines are on the agent's wall clock: set back a day (a VM resumed, NTP stepping
    it), a command of a minute would hold a day and a minute, a probe sampled 1 in 1000
    that long. It holds at most the bound from then, as after a restart."""
    ctl, applied = make(tmp_path)
    assert ctl.handle(cmd(ttl_ms=60_000), sent_ms=T0, now=T0)
    back = T0 - 86_400_000
    ctl.expire(now=back)
    assert ctl.sample_every("file_created") == 10
    ctl.expire(now=back + BOUNDS.max_ttl_ms)
    assert ctl.sample_every("file_created") == 2 and applied[-1] == ("file_created", 2)
    ctl.save(now=back + BOUNDS.max_ttl_ms)
    assert make(tmp_path)[0].command("file_created") is None


# An id that, logged as it is, would end the agent's line and write one of its own.
FORGED = "c1\n2026-01-01 00:00:00,000 WARNING ktel.agent: forged"


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the agent's text log holds of what ktel.control logged, line by line."""
    text = logging.Formatter(logs.TEXT_FORMAT)
    return [line for r in caplog.records if r.name == "ktel.control" for line in text.format(r).splitlines()]


def test_a_newline_in_a_command_id_writes_no_line_of_its_own(tmp_path, caplog):
    """Every line ktel.control's writer can put an id in: refused, applied, in force
    after a restart, expired, restored."""
    now = now_ms()
    with caplog.at_level(logging.INFO, logger="ktel.control"):
        ctl, _ = make(tmp_path)
        assert not ctl.handle(cmd(cmd_id=FORGED, probe="no_such_probe"), sent_ms=now, now=now)
        assert ctl.handle(cmd(cmd_id=FORGED), sent_ms=now, now=now)
        ctl.save()
        again, _ = make(tmp_path)  # a restart: the command still in force
        again.expire(now + 60_000)
        assert again.handle(cmd(cmd_id=FORGED + "-r", restore=True), sent_ms=now, now=now)
    lines = log_lines(caplog)
    assert len(lines) == len(caplog.records) == 5
    assert all(repr(FORGED)[:-1] in line for line in lines)


def test_a_flood_of_bad_records_logs_a_bounded_number_of_lines_and_counts_each(tmp_path, caplog):
    ctl, _ = make(tmp_path)
    probe, undecodable = refused("probe"), refused("undecodable")
    # The same refused command, the same undecodable record, again and again: one line each.
    same = records(*[cmd(cmd_id="bad", probe="no_such_probe")] * 50, sent_ms=T0)
    same += [dataclasses.replace(r, offset=50 + r.offset, value=b"\xc1") for r in same]
    with caplog.at_level(logging.WARNING, logger="ktel.control"):
        ctl.judge(same)
    assert len(log_lines(caplog)) == 2
    # Ever new ones (ids; reasons of records that do not decode): a line each, up to the bound.
    n = 1000
    new = [cmd(cmd_id=f"bad-{i}", probe="no_such_probe") for i in range(n)]
    new += [cmd(cmd_id=f"worse-{i}", every=-i) for i in range(n)]
    with caplog.at_level(logging.WARNING, logger="ktel.control"):
        ctl.judge(records(*new, sent_ms=T0, first=100))
    assert len(log_lines(caplog)) == logs.Once().limit
    # Counted, every one.
    assert refused("probe") == probe + 50 + n
    assert refused("undecodable") == undecodable + 50 + n
    assert ctl.counts["commands_refused"] == 100 + 2 * n


def applied_total() -> float:
    return REGISTRY.get_sample_value("ktel_agent_commands_applied_total") or 0.0


def test_a_flood_of_valid_commands_logs_a_bounded_number_of_lines_and_counts_each(tmp_path, caplog):
    ctl, _ = make(tmp_path)
    before = applied_total()
    # The same command again and again: one line, the first.
    with caplog.at_level(logging.INFO, logger="ktel.control"):
        ctl.judge(records(*[cmd(cmd_id="raise")] * 50, sent_ms=now_ms()))
    [line] = log_lines(caplog)
    assert "command 'raise': file_created sampled 1 in 10" in line
    assert ctl.take_acks() == ["raise"]
    # Ever new ones, raises that expire and raises a restore ends: a line for each command
    # applied or expired, up to the bound (the first command one of them).
    n = 1000
    now = now_ms()
    with caplog.at_level(logging.INFO, logger="ktel.control"):
        for i in range(n):
            assert ctl.handle(cmd(cmd_id=f"raise-{i}", ttl_ms=1), sent_ms=now, now=now)
            ctl.expire(now + 1)
            assert ctl.handle(cmd(cmd_id=f"raise-again-{i}"), sent_ms=now, now=now)
            assert ctl.handle(cmd(cmd_id=f"restore-{i}", restore=True), sent_ms=now, now=now)
    assert len(log_lines(caplog)) == logs.Once().limit
    # Counted and acknowledged, every one.
    assert applied_total() == before + 1 + 3 * n
    assert ctl.counts["commands_applied"] == 1 + 3 * n
    # (the acknowledgements waiting for a heartbeat are bounded on their own: the last ones)
    assert ctl.take_acks()[-1] == f"restore-{n - 1}"
