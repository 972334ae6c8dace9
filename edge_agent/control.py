"""Remote fidelity control: commands from ``ktel.control`` that set a probe's
sampling (1 in N) for a while, applied to the probe's BPF knob map without
reloading anything, and acknowledged in the next heartbeat. When a command's
time is up, or a restore for its probe arrives, the configured rate comes back.

Bounds (docs/design.md, principle 11). Anyone who can write ``ktel.control``
changes hosts, so a command for this host (its target is this host id or "*";
others' commands are not this agent's business) is applied only when its probe
is one ktel knows (``ktel.probes.PROBES``), its ``sample_every`` is at most
``agent.control_max_sample_every`` (the kernel's knob is a u32: a larger value
would wrap around, and every event would carry a weight the kernel did not
apply), it holds at most ``agent.control_max_ttl_seconds`` and its id has at most
``agent.control_max_id_chars`` characters. Any other command is refused: counted
(``ktel_agent_commands_refused_total`` by reason, ``commands_refused`` in the
heartbeat's counters) and named with the reason in the next heartbeat's
``refused_commands``. A record that does not decode is counted under reason
``undecodable``; it has no id to acknowledge. At most ``MAX_PENDING_ACKS``
acknowledgements of each sort, of ``MAX_PENDING_ACK_BYTES``, wait for a heartbeat
(the oldest go first, counted), so heartbeats stay under Kafka's record limit
whatever arrives. Refusals are logged once for each command (an undecodable record's
once for each reason), for 1,000 of them at most (``ktel.logs.Once``), each id as
its ``repr``: a newline in one would otherwise start a forged line of the text log.
A command applied (a restore too) and one expired are logged the same way, once for
each command, for 1,000 commands at most (apart from the refusals, which cannot use up
their bound): a flood of valid commands, the same one again and again or ever new ids,
wrote a line each on every node. Each is counted (``ktel_agent_commands_applied``) and
acknowledged in a heartbeat all the same; past the bound, those are what show them.
A restore is judged by the same bounds but the rate (it carries a rate and a
duration for agents that predate restores; this one puts back its own rate). A
restore ends whatever command is in force for its probe, as any later command for
the probe does: a command sent by hand during a raise ends with the raise.

Durations, not deadlines. A command holds for ``ttl_ms`` from when this agent
applies it, by this agent's clock, so a sender whose clock is ahead or behind
stretches or shortens nothing. A command without ``ttl_ms`` (from a sender that
predates it) holds ``until_ms`` minus its record's Kafka timestamp: both come
from the sender's clock, so the difference is a duration too. The agent's own clock set
back while a command holds stretches it to at most ``agent.control_max_ttl_seconds``
from then.

Restarts. Every command this agent applied is kept in ``<state_dir>/control.json``
with its deadline by this agent's clock (one that expired, was taken over by a later
one for its probe, or was ended by a restore is marked over, not stamped with when it
ended, which a clock set back before a restart would make a deadline to come; a
restore is over when applied), for as long
as its record can be read back at a start (``MAX_REMEMBERED`` at most, and every one
in force), with the offset of the last record judged when the file was written; a
restarted agent re-applies those still in force at once (Kafka may be away) and
keeps their deadlines, so a restart neither ends nor extends a command, nor brings
back one that is over. It then reads the whole (single-partition) topic, without a
consumer group, from ``agent.control_max_ttl_seconds`` back in time by record
timestamps (no command holds longer), and passes over the records up to that
offset: what they did is in the file, also for commands a flood made it forget
(judged again, a raise a restore had ended would come back, and a restore would end
a command sent after it). Past that offset (records judged after the last write,
or all of them if the file was lost): a command it had applied stands as it was
applied, whatever a record of its id says; one it had not (sent while it was
down, or its state was lost) holds until the earlier of a full TTL from now and
its record's timestamp plus the TTL, so it can end early if the sender's clock is
behind, but never holds past a full TTL; one over already still ends the command
before it for its probe, as it did when it was sent. An offset at or past the topic's end is
from a topic deleted and made again, and is not taken (one made again that has
already grown past it cannot be told apart: its records up to it are passed over).
Made again while followed, the follower's position is past the new topic's end, and
Kafka finds it out of range: the offset is not taken from there either, and the new
topic is read from the look-back, its records judged by their times, as at a start.
The consumer resets nothing itself (``auto_offset_reset`` "none"): reset to the end,
aiokafka's default, it passed over every command sent to the new topic before its
next fetch (the agent cut off from Kafka meanwhile, or waiting on its metadata). So
is a position whose records retention deleted before they were read (an agent cut
off for longer than the topic keeps them) read from the look-back, the offset kept.
The two are told apart by the topic's first offset, looked up after that fetch, which
retention alone moves past the position: a new topic grown past the position since
(commands sent while the agent looked it up) is still one made again.
A topic made again that reached the position before that fetch cannot be told apart
here either: its records before the position are passed over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter

from ktel import kafka_client
from ktel.kafka_client import Kafka, client_kwargs, settings
from ktel.logs import Once
from ktel.probes import PROBES
from ktel.retry import retry
from ktel.wire import ControlCommand, WireError, decode_command
from ktel.wire.control import EVERY_HOST, REFUSAL_CHARS

if TYPE_CHECKING:
    from ktel.config import AgentConfig

log = logging.getLogger("ktel.control")

APPLIED = Counter("ktel_agent_commands_applied", "control commands applied")
REFUSED = Counter(
    "ktel_agent_commands_refused",
    "control commands refused: undecodable, or out of bounds (probe, sample_every, ttl, id)",
    ["reason"],
)
ACKS_DROPPED = Counter(
    "ktel_agent_command_acks_dropped",
    "acknowledgements of commands dropped while heartbeats could not go out",
)
# Acknowledgements of each sort waiting for a heartbeat (Pending): 256 ids of 512 ASCII
# characters, with a refusal's reason of 256, are 192 KiB. Bytes are bounded too: an id
# of 512 characters may take 2 KiB in UTF-8, and 256 of each sort made a heartbeat of
# 1.1 MB, which Kafka refused, and every later one, which carried them again. The two
# sorts and the most containers a heartbeat lists (about 350 KiB) fit its 1 MiB.
MAX_PENDING_ACKS = 256
MAX_PENDING_ACK_BYTES = 192 << 10
# Applied commands remembered across restarts; a flood beyond it forgets the oldest,
# which after a restart are judged by their record's timestamp instead.
MAX_REMEMBERED = 1024
# The deadline of a command that no longer holds (expired, taken over, a restore).
OVER = 0
STATE_FILE = "control.json"
# How often, at most, the follower writes the state file (save_due). Each write takes
# the whole file, up to MAX_REMEMBERED commands with ids of up to 2 KiB (6 MB of JSON,
# 28 ms): written after every fetch, a command every few ms, each in a fetch of its
# own, kept every agent's event loop and disk writing it. What was judged since the
# last write is judged again by its record's time after a SIGKILL, as when it came.
SAVE_INTERVAL_S = 1.0
# The control consumer, on a topic that is written rarely. A fetch waits at the broker
# until a record arrives (fetch_min_bytes 1) or FETCH_WAIT_MS pass, so a command is
# read within a round trip of being written whatever this is; it sets only how often
# an idle agent asks again (aiokafka's default, 500 ms, is two requests a second).
# aiokafka's fetch routine wakes on every fetch's answer, and otherwise every
# FETCH_ROUTINE_MS (its default, 200 ms, would be five wake-ups a second).
FETCH_WAIT_MS = 10_000
FETCH_ROUTINE_MS = 10_000


class Pending:
    """Acknowledgements (command ids) or refusals ([id, reason]) waiting for a heartbeat:
    at most MAX_PENDING_ACKS of them, of MAX_PENDING_ACK_BYTES in UTF-8, the oldest
    dropped first, counted."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._bytes = 0

    @staticmethod
    def _size(item: str | list[str]) -> int:
        return sum(len(s.encode()) for s in ([item] if isinstance(item, str) else item))

    def put(self, front: list[Any], *back: Any) -> None:
        """``front`` before what is pending, ``back`` after it."""
        self._items.extendleft(reversed(front))
        self._items.extend(back)
        self._bytes += sum(map(self._size, front)) + sum(map(self._size, back))
        while len(self._items) > MAX_PENDING_ACKS or self._bytes > MAX_PENDING_ACK_BYTES:
            self._bytes -= self._size(self._items.popleft())
            ACKS_DROPPED.inc()

    def take(self) -> list[Any]:
        items = list(self._items)
        self._items.clear()
        self._bytes = 0
        return items


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True)
class Bounds:
    max_sample_every: int
    max_ttl_ms: int
    max_id_chars: int

    @classmethod
    def of(cls, acfg: AgentConfig) -> Bounds:
        return cls(
            acfg.control_max_sample_every,
            int(acfg.control_max_ttl_seconds * 1000),
            acfg.control_max_id_chars,
        )


@dataclasses.dataclass(frozen=True)
class InForce:
    """A command this agent applied: its deadline is by this agent's clock (``OVER`` once
    it expired, or a later command for its probe took over); remembered until ``keep_ms``,
    as long as its record may be read back at a start, so that it is never applied twice."""

    id: str
    probe: str
    sample_every: int
    deadline_ms: int
    keep_ms: int


class Control:
    def __init__(
        self,
        host_id: str,
        configured: dict[str, int],
        apply: Callable[[str, int], None],
        bounds: Bounds,
        state_dir: Path,
    ):
        self.host_id = host_id
        self.configured = configured
        self.apply = apply
        self.bounds = bounds
        self.state_path = state_dir / STATE_FILE
        self.overrides: dict[str, InForce] = {}
        # Every command applied that may still hold, by id, in the order applied.
        self.applied: dict[str, InForce] = {}
        self._unsaved = False  # commands applied since the state file was last written
        self._saved_at = -SAVE_INTERVAL_S  # time.monotonic() of the last write (save_due)
        # Every record of ktel.control up to this offset was judged, and what it did
        # is in the state file (None: none known to be).
        self.judged_to: int | None = None
        # The topic's end where the follower began reading (``begin``), before which a
        # record is one read back.
        self._read_back_to = 0
        self._acks = Pending()
        self._refusals = Pending()
        self.counts = {"commands_applied": 0, "commands_refused": 0}
        # The refusals logged, each command (or undecodable record's reason) once, 1,000 at
        # most: anyone who can write ktel.control reaches every agent, and a flood of bad
        # records logged a line each on every node. Each is counted all the same.
        self._warned = Once()
        # The commands applied (restores too) and expired logged, each command once, 1,000
        # commands at most: a flood of valid commands (one sent again and again, or ever
        # new ids) logged a line each on every node. Kept apart from the refusals' bound,
        # so that a flood of bad records does not hide what changed the host, nor the
        # reverse. Each is counted and acknowledged all the same.
        self._told = Once()
        self._load()

    @classmethod
    def of(cls, acfg: AgentConfig, apply: Callable[[str, int], None]) -> Control:
        return cls(acfg.host_id, acfg.sample_every, apply, Bounds.of(acfg), acfg.state_dir)

    def sample_every(self, probe: str) -> int:
        cmd = self.overrides.get(probe)
        return cmd.sample_every if cmd else self.configured.get(probe, 1)

    def command(self, probe: str) -> InForce | None:
        return self.overrides.get(probe)

    def refusal(self, cmd_id: str, probe: str, sample_every: int, ttl_ms: int) -> tuple[str, str] | None:
        """(reason label, reason text) when a command is out of bounds, else None."""
        b = self.bounds
        if probe not in PROBES:
            return "probe", f"unknown probe {probe!r:.64}"  # (a repr may be 10 times its string)
        if sample_every > b.max_sample_every:
            return "sample_every", f"sample_every {sample_every} is over the agent's {b.max_sample_every}"
        if ttl_ms > b.max_ttl_ms:
            return "ttl", f"holds {ttl_ms} ms, over the agent's {b.max_ttl_ms}"
        if ttl_ms <= 0:  # (else neither applied nor refused: its sender would never hear)
            return "ttl", f"holds {ttl_ms} ms: over before it starts"
        if len(cmd_id) > b.max_id_chars:
            return "id", f"id of {len(cmd_id)} characters, over the agent's {b.max_id_chars}"
        return None

    def handle(
        self, cmd: ControlCommand, sent_ms: int, now: int | None = None, replayed: bool = False
    ) -> bool:
        """Apply a command meant for this host; True if it took effect.

        ``sent_ms``: its record's Kafka timestamp. ``replayed``: read back after a
        start (it was in the topic before this agent began following it)."""
        if cmd.target not in (self.host_id, EVERY_HOST):
            return False
        now = now if now is not None else now_ms()
        ttl_ms = cmd.ttl_ms if cmd.ttl_ms is not None else cmd.until_ms - sent_ms
        # (a restore's rate is for agents that predate restores: this one applies its own,
        # so a sender's rate above this agent's bound must not keep a raise in force)
        refused = self.refusal(cmd.id, cmd.probe, 1 if cmd.restore else cmd.sample_every, ttl_ms)
        if refused is not None:
            self._refuse(cmd.id, *refused)
            return False
        known = self.applied.get(cmd.id)
        if known is None and cmd.restore:
            return self._restore(cmd, sent_ms, now)
        if known is not None:
            # Applied before (a restart, the record sent again): as it was applied, neither
            # ended nor extended, whatever this record says (a restore: over when applied).
            in_force = known
        elif replayed:
            in_force = InForce(cmd.id, cmd.probe, cmd.sample_every, min(now + ttl_ms, sent_ms + ttl_ms), 0)
        else:
            in_force = InForce(cmd.id, cmd.probe, cmd.sample_every, now + ttl_ms, 0)
        if in_force.deadline_ms <= now:
            if known is None and cmd.probe in self.overrides:
                # Read back at a start, over already: when it was sent it took over the
                # probe's command before it in the topic, which must not hold again either.
                self._end(cmd.probe, now)
                self.apply(cmd.probe, self.sample_every(cmd.probe))
            return False  # over already (read back after a restart, or taken over)
        if known is None:
            # Read back at a start while its record is within the look-back (its sender's
            # clock: the look-back goes by record times).
            keep = max(in_force.deadline_ms, sent_ms + self.bounds.max_ttl_ms)
            in_force = dataclasses.replace(in_force, keep_ms=keep)
        self._end(in_force.probe, now, unless=in_force.id)
        self.overrides[in_force.probe] = in_force
        self.apply(in_force.probe, in_force.sample_every)
        if known is None:
            self._applied(in_force)
        if self._told(("applied", in_force.id)):
            log.info(
                "command %.120r: %s sampled 1 in %d for %d ms more",
                in_force.id,
                in_force.probe,
                in_force.sample_every,
                in_force.deadline_ms - now,
            )
        return True

    def _restore(self, cmd: ControlCommand, sent_ms: int, now: int) -> bool:
        """A restore not applied before: the probe's command in force ends now and the
        configured rate comes back. One read back at a start ends what the records before
        it in the topic brought back, as it did when it was sent."""
        self._end(cmd.probe, now)
        rate = self.sample_every(cmd.probe)
        self.apply(cmd.probe, rate)
        # Remembered as a command over as soon as applied, so that its record read back
        # at a start ends nothing applied after it.
        self._applied(InForce(cmd.id, cmd.probe, rate, OVER, max(now, sent_ms + self.bounds.max_ttl_ms)))
        if self._told(("applied", cmd.id)):
            log.info("command %.120r: %s back to 1 in %d", cmd.id, cmd.probe, rate)
        return True

    def _end(self, probe: str, now: int, unless: str | None = None) -> None:
        """End the probe's command in force (unless it is ``unless``): taken over by a
        later command or a restore, it ends now, also for a restart, which would
        otherwise bring it back."""
        before = self.overrides.get(probe)
        if before is None or before.id == unless:
            return
        del self.overrides[probe]
        self._over(before)

    def _over(self, cmd: InForce) -> None:
        """``cmd`` no longer holds, for a restart too: remembered with the deadline
        ``OVER``, not the time it ended, which a clock set back before the restart would
        put in the future again (and bring the command back for as long)."""
        self.applied[cmd.id] = dataclasses.replace(cmd, deadline_ms=OVER)
        self._unsaved = True

    def _applied(self, cmd: InForce) -> None:
        """A command applied for the first time: remembered, counted and acknowledged."""
        self.applied[cmd.id] = cmd
        self._unsaved = True  # (written at most once every SAVE_INTERVAL_S: save_due)
        if len(self.applied) > 2 * MAX_REMEMBERED:
            # A flood: the oldest go now, not at the next write, a second of fetches away
            # (down to MAX_REMEMBERED, so that forgetting costs a command O(1) on average).
            self._forget(now_ms(), MAX_REMEMBERED)
        APPLIED.inc()
        self.counts["commands_applied"] += 1
        self._acks.put([], cmd.id)

    def refuse_undecodable(self, offset: int, err: WireError) -> None:
        REFUSED.labels("undecodable").inc()
        self.counts["commands_refused"] += 1
        why = str(err)
        if self._warned(hash(("undecodable", why))):
            log.warning("refusing control record at offset %d: %.300r", offset, why)

    def _refuse(self, cmd_id: str, label: str, reason: str) -> None:
        REFUSED.labels(label).inc()
        self.counts["commands_refused"] += 1
        # (cut to what a heartbeat takes: one that did not decode would be dead-lettered whole)
        self._refusals.put([], [cmd_id[: self.bounds.max_id_chars], reason[:REFUSAL_CHARS]])
        if self._warned(hash((label, cmd_id))):
            log.warning("refusing command %.120r: %s", cmd_id, reason)

    def expire(self, now: int | None = None) -> None:
        now = now if now is not None else now_ms()
        for probe, cmd in list(self.overrides.items()):
            if cmd.deadline_ms > now + self.bounds.max_ttl_ms:
                # The clock was set back while it held: no command holds longer than the
                # bound from now (as _load bounds one after a restart).
                cmd = dataclasses.replace(cmd, deadline_ms=now + self.bounds.max_ttl_ms)
                self.overrides[probe] = cmd
                if cmd.id in self.applied:
                    self.applied[cmd.id] = cmd
                    self._unsaved = True
            if cmd.deadline_ms <= now:
                del self.overrides[probe]
                self._over(cmd)
                self.apply(probe, self.sample_every(probe))
                if self._told(("expired", cmd.id)):
                    log.info(
                        "command %.120r expired: %s back to 1 in %d", cmd.id, probe, self.sample_every(probe)
                    )

    def take_acks(self) -> list[str]:
        return self._acks.take()

    def take_refusals(self) -> list[list[str]]:
        return self._refusals.take()

    def unack(self, ids: list[str], refusals: list[list[str]]) -> None:
        """A heartbeat carrying these acknowledgements was not sent: carry them in the
        next (within the bound, which drops the oldest)."""
        self._acks.put(ids)
        self._refusals.put(refusals)

    # ------------------------------------------------------------ restarts

    def _load(self) -> None:
        """Re-apply what was in force at the last stop (see the module doc)."""
        try:
            saved = json.loads(self.state_path.read_text())
            # (an older agent's file is the rows alone; its rows have no keep_ms, and
            # are remembered until their deadline)
            rows, judged_to = (
                (saved, None) if isinstance(saved, list) else (saved["applied"], saved["judged_to"])
            )
            applied = [
                InForce(str(i), str(p), int(n), int(d), int(k[0]) if k else int(d)) for i, p, n, d, *k in rows
            ]
            if judged_to is not None and (type(judged_to) is not int or judged_to < 0):
                raise ValueError(f"judged_to {judged_to!r:.40}: not an offset")
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, OverflowError, RecursionError) as err:
            # Kafka's look-back still brings the commands back, judged by their records' times.
            # (OverflowError: an infinity, which json takes; RecursionError: nested too deep.
            # Not caught, the agent would fail at every start until the file was removed.)
            log.warning("ignoring %s: %s", self.state_path, err)
            return
        self.judged_to = judged_to
        now = now_ms()
        for cmd in applied:
            # No command holds longer than the bound from now: a clock set back since the
            # file was written, or a deadline edited into it, would otherwise stretch one.
            cmd = dataclasses.replace(cmd, deadline_ms=min(cmd.deadline_ms, now + self.bounds.max_ttl_ms))
            if cmd.keep_ms > now:
                self.applied[cmd.id] = cmd
            # (a rate below 1 or an id past the bound, which no command carries, only from a
            # damaged file: the kernel's knob is a u32, and a heartbeat naming such a rate, or
            # an id of over 512 characters, does not decode)
            if (
                cmd.deadline_ms > now
                and cmd.probe in PROBES
                and 1 <= cmd.sample_every <= self.bounds.max_sample_every
                and len(cmd.id) <= self.bounds.max_id_chars
            ):
                self.overrides[cmd.probe] = cmd  # in the order applied: the last one stands
        for cmd in self.overrides.values():
            log.info("command %.120r still in force: %s sampled 1 in %d", cmd.id, cmd.probe, cmd.sample_every)

    def save(self, now: int | None = None) -> None:
        """Write the commands in force to the state file, if any were applied since it
        was last written. The follower calls it at most once every SAVE_INTERVAL_S
        (save_due), not once a command: each write takes the whole file (up to
        MAX_REMEMBERED rows), and a flood of commands in one fetch held the agent's event
        loop for seconds. An agent killed before it wrote a command judges it again by
        its record's time, as one it had not seen."""
        if not self._unsaved:
            return
        self._unsaved = False
        self._forget(now if now is not None else now_ms(), MAX_REMEMBERED)
        rows = [[c.id, c.probe, c.sample_every, c.deadline_ms, c.keep_ms] for c in self.applied.values()]
        self._saved_at = time.monotonic()
        tmp = self.state_path.with_suffix(".tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"judged_to": self.judged_to, "applied": rows}))
            os.replace(tmp, self.state_path)
        except OSError as err:
            # The command is in force all the same; only a restart would judge it by its record's time.
            log.warning("cannot record the commands in force in %s: %s", self.state_path, err)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _forget(self, now: int, most: int) -> None:
        """Forget the commands no record read back at a start can bring (past their
        keep_ms), and the oldest beyond ``most``; never one in force."""
        in_force = {cmd.id for cmd in self.overrides.values()}
        for cmd_id, cmd in list(self.applied.items()):
            if cmd_id not in in_force and (cmd.keep_ms <= now or len(self.applied) > most):
                del self.applied[cmd_id]

    def save_due(self) -> float:
        """``save`` if SAVE_INTERVAL_S passed since the last write; the seconds until the
        next write is due (FETCH_WAIT_MS worth when none is)."""
        if not self._unsaved:
            return FETCH_WAIT_MS / 1000
        left = self._saved_at + SAVE_INTERVAL_S - time.monotonic()
        if left > 0:
            return left
        self.save()
        return FETCH_WAIT_MS / 1000

    # ------------------------------------------------------------- follow

    def begin(self, start: int, end: int, lost_at: int | None = None, first: int = 0) -> None:
        """Reading ktel.control from offset ``start``, the topic ending at offset ``end``:
        at the follower's start, or again when Kafka found the offset it was reading at,
        ``lost_at``, out of the topic's range, the topic's first offset being ``first``
        (looked up after that fetch)."""
        self._read_back_to = end
        if lost_at is not None and lost_at >= first:
            # Not before the first offset, which retention moves past it in the same topic
            # alone: past the topic's end at that fetch, a topic made again, whatever end it
            # has reached since (sent commands while the follower looked it up, the broker
            # away meanwhile); its records up to lost_at were judged by no one.
            self._made_again(f"ended before offset {lost_at}, where the agent was reading")
        elif self.judged_to is not None and self.judged_to >= end:
            self._made_again(f"it ends at {end}")
        elif lost_at is not None:
            log.warning(
                "ktel.control found offset %d, where the agent was reading, out of its range "
                "(records deleted by retention before they were read): reading again from offset %d",
                lost_at,
                start,
            )

    def _made_again(self, why: str) -> None:
        """ktel.control was deleted and made again: none of its records was judged. Also
        at the file's next write, so that a start after the new topic grew past the old
        offset does not pass over records no one judged."""
        judged = (
            f" (judged up to offset {self.judged_to} in {self.state_path})"
            if self.judged_to is not None
            else ""
        )
        log.warning(
            "ktel.control %s: a topic made again, whose records are judged by their times%s", why, judged
        )
        self.judged_to = None
        self._unsaved = True

    def judge(self, records: Iterable[ConsumerRecord[Any, bytes]]) -> None:
        """Records of ktel.control in offset order, from where ``begin`` said."""
        for rec in records:
            if self.judged_to is not None and rec.offset <= self.judged_to:
                continue  # judged before the last stop: the state file holds what it did
            try:
                cmd = decode_command(rec.value)
            except WireError as err:
                self.refuse_undecodable(rec.offset, err)
            else:
                self.handle(cmd, rec.timestamp, replayed=rec.offset < self._read_back_to)
            self.judged_to = rec.offset

    async def follow(self, kafka: Kafka) -> None:
        consumer = AIOKafkaConsumer(
            **client_kwargs(kafka),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_WAIT_MS,
            consumer_timeout_ms=FETCH_ROUTINE_MS,
            # A position out of the topic's range raises OffsetOutOfRangeError, for the
            # follower to read again from the look-back: aiokafka's default ("latest")
            # went to the end, past every record sent to a topic made again before it
            # was fetched from (module docstring).
            auto_offset_reset="none",
        )
        # ktel.control has one partition (ktel/topics.py)
        tp = TopicPartition(settings(kafka).topics.control, 0)
        async with kafka_client.started(consumer, kafka, "ktel agent (ktel.control consumer)"):

            async def start_position() -> tuple[int, int]:
                # The end is read before the lookup: a command sent after a lookup
                # that found nothing comes at or after it, and is read.
                end = (await consumer.end_offsets([tp]))[tp]
                found = await consumer.offsets_for_times({tp: max(0, now_ms() - self.bounds.max_ttl_ms)})
                return (found[tp].offset if found.get(tp) is not None else end), end

            async def first_offset() -> int:
                return (await consumer.beginning_offsets([tp]))[tp]

            # Retried like the connection: a broker away for long at the agent's
            # start must not leave it deaf to commands for good.
            start, end = await retry(start_position, what="find where to read ktel.control from")
            self.begin(start, end)
            # Assigned only now, and sought at once: without a position, the fetcher would
            # fail it (NoOffsetForPartitionError, with no reset to go by).
            consumer.assign([tp])
            consumer.seek(tp, start)
            wait_s = FETCH_WAIT_MS / 1000
            try:
                while True:
                    try:
                        # Returns as soon as records are fetched: the timeout bounds an idle
                        # wait, and a write due comes no later than its time.
                        fetched = await consumer.getmany(timeout_ms=max(1, round(wait_s * 1000)))
                    except OffsetOutOfRangeError:
                        # The topic made again (its end now before the position), or the
                        # records ahead deleted by retention (an agent cut off from Kafka
                        # for longer than the topic keeps them): the records there were
                        # sent while this agent did not read, and are judged as at a start.
                        at = await consumer.position(tp)
                        first = await retry(first_offset, what="find where ktel.control begins")
                        start, end = await retry(start_position, what="find where to read ktel.control from")
                        self.begin(start, end, lost_at=at, first=first)
                        consumer.seek(tp, start)
                        fetched = {}
                    for recs in fetched.values():
                        self.judge(recs)
                    wait_s = self.save_due()
            finally:
                self.save()  # (what was judged since the last write: the agent stops)
