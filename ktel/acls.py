"""The Kafka ACLs that give each ktel role the least it needs (``ktel acls``).

One principal per role (``kafka.principals.*``):

agent      writes ktel.raw and ktel.heartbeats, reads ktel.control (without a group).
           It cannot write ktel.control: a compromised host cannot change any host's
           sampling (docs/design.md, principle 11).
processor  reads the raw and intermediate topics and ktel.heartbeats; writes the
           intermediate and output topics, ktel.control (fidelity commands) and
           ktel.dlq; its consumer groups ``ktel-<stage>``; its own topics
           ``ktel-<stage>-*`` (table changelogs, Faust's assignor topic), which it
           creates.
exporter   reads ktel.metrics, ktel.spans and ktel.logs in its groups
           (``ktel-export-*``), writes ktel.dlq.
operator   writes ktel.control (fidelity commands by hand).
dlq        what `ktel dlq` needs: reads ktel.dlq (without a group), and, to re-drive,
           reads and writes the topics the stages read (ktel.raw, the intermediate
           topics, ktel.heartbeats), and reads the output topics: it reads each dead
           letter's original back before it writes it again, or, an exporter's, sends
           it to the exporter's backend; and writes ktel.dlq, the marker of each dead
           letter it delivered, which a later re-drive skips. It writes neither the
           output topics nor ktel.control.
status     what `ktel status` reads, and nothing more: reads ktel.heartbeats (without a
           group); describes ktel's consumer groups (``ktel-*``) and the topics they
           consume (ktel's own and the stages' ``ktel-<stage>-*``), for their members,
           committed offsets and end offsets. It writes no topic and joins no group.

Under ``kafka.prefix`` every topic and group named here starts with the prefix.

Read and Write imply Describe. The idempotent producers (agent, exporters) need no
cluster ACL on Kafka 3 and later. Creating ktel's topics (``ktel topics``) is an
administrator's job and not granted here.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable

from ktel.config import KafkaConfig
from ktel.wire.topics import Topics


@dataclasses.dataclass(frozen=True)
class Grant:
    role: str
    operations: tuple[str, ...]
    resource: str  # kafka-acls' resource flag: topic or group
    names: tuple[str, ...]
    prefixed: bool = False


def grants(stages: Iterable[str], t: Topics) -> list[Grant]:
    """Every role's grants; ``stages``: the names of ``ktel process`` stages; ``t``:
    the topic and group names (under ``kafka.prefix``)."""
    stages = tuple(stages)
    intermediate = (t.deduped, t.enriched, t.sampled)
    outputs = (t.metrics, t.spans, t.logs)
    stage_inputs = (t.raw, *intermediate, t.heartbeats)  # (what `ktel dlq --redrive` writes)
    return [
        Grant("agent", ("Write",), "topic", (t.raw, t.heartbeats)),
        Grant("agent", ("Read",), "topic", (t.control,)),
        Grant("processor", ("Read",), "topic", (t.raw, *intermediate, t.heartbeats)),
        Grant("processor", ("Write",), "topic", (*intermediate, *outputs, t.control, t.dlq)),
        Grant("processor", ("Read",), "group", tuple(t.group(s) for s in stages)),
        Grant(
            "processor",
            ("Create", "Read", "Write"),
            "topic",
            tuple(f"{t.group(s)}-" for s in stages),
            prefixed=True,
        ),
        Grant("exporter", ("Read",), "topic", outputs),
        Grant("exporter", ("Read",), "group", (t.group("export-"),), prefixed=True),
        Grant("exporter", ("Write",), "topic", (t.dlq,)),
        Grant("operator", ("Write",), "topic", (t.control,)),
        Grant("dlq", ("Read",), "topic", (t.dlq, *stage_inputs, *outputs)),
        Grant("dlq", ("Write",), "topic", (*stage_inputs, t.dlq)),  # (ktel.dlq: the re-drive markers)
        Grant("status", ("Read",), "topic", (t.heartbeats,)),
        Grant("status", ("Describe",), "topic", (t.raw, *intermediate, *outputs)),
        Grant("status", ("Describe",), "topic", (t.group(""),), prefixed=True),
        Grant("status", ("Describe",), "group", (t.group(""),), prefixed=True),
    ]


def commands(kafka: KafkaConfig, stages: Iterable[str], command_config: str | None = None) -> list[list[str]]:
    """``kafka-acls.sh`` argument lists adding every grant for the configured principals."""
    out = []
    for g in grants(stages, kafka.topics):
        argv = ["kafka-acls.sh", "--bootstrap-server", kafka.bootstrap]
        if command_config:
            argv += ["--command-config", command_config]
        argv += ["--add", "--allow-principal", getattr(kafka.principals, g.role)]
        for op in g.operations:
            argv += ["--operation", op]
        if g.prefixed:
            argv += ["--resource-pattern-type", "prefixed"]
        for name in g.names:
            argv += [f"--{g.resource}", name]
        out.append(argv)
    return out


def script(kafka: KafkaConfig, stages: Iterable[str], command_config: str | None = None) -> str:
    stages = tuple(stages)
    lines = []
    role = None
    for g, argv in zip(grants(stages, kafka.topics), commands(kafka, stages, command_config), strict=True):
        if g.role != role:
            role = g.role
            lines.append(f"# {role}: {getattr(kafka.principals, role)}")
        lines.append(shlex.join(argv))
    return "\n".join(lines)
