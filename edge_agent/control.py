"""Remote fidelity control: commands from ``ktel.control`` that set a probe's
sampling (1 in N) until a deadline, applied to the probe's BPF knob map without
reloading anything, and acknowledged in the next heartbeat. When a command's
deadline passes, the configured rate comes back.

Every agent reads the whole (single-partition) topic without a consumer group,
starting ``LOOKBACK`` back in time, so a restarted agent re-applies commands
that are still in force.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter

from ktel.kafka_client import Kafka, client_kwargs, settings
from ktel.retry import retry
from ktel.wire import CONTROL_TOPIC, ControlCommand, WireError, decode_command

log = logging.getLogger("ktel.control")

BAD_COMMANDS = Counter("ktel_agent_bad_commands", "control records that did not decode")
LOOKBACK_MS = 3_600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Control:
    def __init__(self, host_id: str, configured: dict[str, int], apply: Callable[[str, int], None]):
        self.host_id = host_id
        self.configured = configured
        self.apply = apply
        self.overrides: dict[str, ControlCommand] = {}
        self._acks: list[str] = []

    def sample_every(self, probe: str) -> int:
        cmd = self.overrides.get(probe)
        return cmd.sample_every if cmd else self.configured.get(probe, 1)

    def command(self, probe: str) -> ControlCommand | None:
        return self.overrides.get(probe)

    def handle(self, cmd: ControlCommand, now: int | None = None) -> bool:
        """Apply a command meant for this host; True if it took effect."""
        if cmd.target not in (self.host_id, "*"):
            return False
        if cmd.until_ms <= (now if now is not None else now_ms()):
            return False  # already over (read back after a restart)
        self.overrides[cmd.probe] = cmd
        self.apply(cmd.probe, cmd.sample_every)
        self._acks.append(cmd.id)
        log.info("command %s: %s sampled 1 in %d until %d", cmd.id, cmd.probe, cmd.sample_every, cmd.until_ms)
        return True

    def expire(self, now: int | None = None) -> None:
        now = now if now is not None else now_ms()
        for probe, cmd in list(self.overrides.items()):
            if cmd.until_ms <= now:
                del self.overrides[probe]
                self.apply(probe, self.sample_every(probe))
                log.info("command %s expired: %s back to 1 in %d", cmd.id, probe, self.sample_every(probe))

    def take_acks(self) -> list[str]:
        acks, self._acks = self._acks, []
        return acks

    def unack(self, ids: list[str]) -> None:
        """A heartbeat carrying these acknowledgements was not sent: carry them in the next."""
        self._acks[:0] = ids

    async def follow(self, kafka: Kafka) -> None:
        consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None, enable_auto_commit=False)
        await retry(consumer.start, what=f"connect the control consumer to {settings(kafka).bootstrap}")
        tp = TopicPartition(CONTROL_TOPIC, 0)  # ktel.control has one partition (ktel/topics.py)
        try:
            consumer.assign([tp])

            async def start_position() -> int:
                # The end is read before the lookup: a command sent after a lookup
                # that found nothing comes at or after it, and is read.
                end = (await consumer.end_offsets([tp]))[tp]
                found = await consumer.offsets_for_times({tp: now_ms() - LOOKBACK_MS})
                return found[tp].offset if found.get(tp) is not None else end

            # Retried like the connection: a broker away for long at the agent's
            # start must not leave it deaf to commands for good.
            consumer.seek(tp, await retry(start_position, what="find where to read ktel.control from"))
            while True:
                for recs in (await consumer.getmany(timeout_ms=1000)).values():
                    for rec in recs:
                        try:
                            self.handle(decode_command(rec.value))
                        except WireError as err:
                            BAD_COMMANDS.inc()
                            log.warning("ignoring control record at offset %d: %s", rec.offset, err)
        finally:
            await consumer.stop()
