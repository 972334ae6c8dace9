import re

import pytest

from edge_agent.redact import Redactor
from ktel.config import ConfigError, RedactRule
from ktel.probes import KIND_BY_NAME, KINDS
from ktel.wire import FILE_CREATED, RawBatch, decode_batch, decode_heartbeat, encode_batch, encode_heartbeat

T = 1_700_000_000_000_000_000


def ev(path):
    return [FILE_CREATED.id, 1, 2, 2, 0, "vim", path, 0o101, False]


def test_rules_mask_before_sealing():
    r = Redactor(
        [
            RedactRule(kind="file_created", field="path", pattern=r"^/home/[^/]+", replacement="/home/*"),
            RedactRule(kind="file_created", field="path", pattern=r"secret[^/]*"),
        ]
    )
    events = [ev("/home/alice/notes.txt"), ev("/etc/secret.key"), ev("/tmp/plain")]
    r.apply(events)
    assert [e[6] for e in events] == ["/home/*/notes.txt", "/etc/***", "/tmp/plain"]
    assert events[0][5] == "vim"  # other fields untouched


def test_no_rules_is_falsy_so_the_agent_skips_the_loop():
    assert not Redactor([])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            RedactRule(kind="nope", field="path", pattern="x"),
            "agent.redact[0].kind = 'nope': unknown event kind",
        ),
        (RedactRule(kind="file_created", field="cwd", pattern="x"), "agent.redact[0].field = 'cwd'"),
    ],
)
def test_bad_rules_name_the_field(rule, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Redactor([rule])


def test_bad_pattern_is_a_config_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RedactRule(kind="file_created", field="path", pattern="(")


def rule(kind, field, pattern, replacement="***"):
    return RedactRule(kind=kind, field=field, pattern=pattern, replacement=replacement)


def test_every_type_a_rule_names_is_masked_and_the_batch_stays_valid():
    metric, span, hist = (KIND_BY_NAME[n] for n in ("ktel_metric", "ktel_span", "histogram_delta"))
    r = Redactor(
        [
            rule("ktel_metric", "labels", "alice"),  # a map of strings
            rule("ktel_metric", "value", r"^\d{4}$", "0"),  # a number: its decimal text
            rule("ktel_metric", "pid", "4242"),  # a non-number replacement: 0
            rule("ktel_span", "parent_span_id", r"\xde\xad", "XX"),  # binary, same length
            rule("ktel_span", "trace_id", r"\x00"),  # binary, its length changed: the empty id
            rule("ktel_span", "attrs", "secret-[0-9]+"),
            rule("histogram_delta", "labels", "alice"),  # strings and integers
            rule("histogram_delta", "sum", "7"),  # a u64 made 0 rather than refused
            rule("file_created", "path", "x", "y" * 100),  # longer than the field allows: cut
        ]
    )
    events = [
        [metric.id, T, 4242, "counter", "logins_total", {"user": "alice", "shell": "/bin/alice-sh"}, 1234],
        [metric.id, T, 7, "gauge", "g", {}, 12345],
        [
            span.id,
            T,
            1,
            1,
            bytes(16),
            bytes(8),
            b"\xde\xad\xbe\xef\x00\x00\x00\x01",
            "op",
            T,
            T,
            0,
            {"k": "secret-42"},
        ],
        [
            hist.id,
            T,
            T,
            "syscall_latency",
            "ns",
            {"user": "alice", "syscall.id": 110},
            3,
            17,
            [3] + [0] * 39,
            1,
        ],
        ev("/" + "x" * 4000),
    ]
    r.apply(events)
    m1, m2, sp, h, fc = events
    assert m1[4:7] == ["logins_total", {"user": "***", "shell": "/bin/***-sh"}, 0]
    assert m1[2] == 0 and m2[2] == 7 and m2[6] == 12345
    assert sp[4] == bytes(16) and sp[5] == bytes(8)  # masked: the empty trace id; no rule
    assert sp[6] == b"XX\xbe\xef\x00\x00\x00\x01" and sp[11] == {"k": "***"}
    assert h[5] == {"user": "***", "syscall.id": 110} and h[7] == 0
    assert fc[6] == "/" + "y" * (KIND_BY_NAME["file_created"].fields[5].type.max_len - 1)
    for e in events:
        assert KINDS[e[0]].valid(e), KINDS[e[0]].why(e)
    batch = RawBatch("h", "b", 0, T, events)
    assert decode_batch(encode_batch(batch)).events == events


def test_a_masked_binary_id_of_the_wrong_length_becomes_the_empty_id():
    r = Redactor([rule("ktel_span", "trace_id", r"\x01"), rule("ktel_span", "parent_span_id", r"\x01")])
    span = KIND_BY_NAME["ktel_span"]
    e = [span.id, T, 1, 1, b"\x01" * 16, b"\x02" * 8, b"\x01" * 8, "op", T, T, 0, {}]
    r.apply([e])
    assert e[4] == bytes(16) and e[6] == b""  # lengths the wire takes (16; 0 or 8)
    assert span.valid(e)


def test_heartbeat_host_and_container_attributes_are_masked_and_its_identity_kept():
    r = Redactor(
        [
            rule("heartbeat", "host.name", r"^[^.]+", "node"),
            rule("heartbeat", "k8s.pod.name", "payroll", "app"),
            rule("heartbeat", "os.version", ".", "v" * 2),  # longer than the wire's 1024: cut
        ]
    )
    assert not r  # no rule for events: the agent skips the per-event loop
    hb = {
        "ts": 1,
        "host": {
            "host.id": "payroll-1",
            "host.name": "payroll-1.corp",
            "boot.id": "b",
            "os.version": "6" * 600,
        },
        "probes": {},
        "counters": {},
        "containers": [[7, {"container.id": "c", "k8s.pod.name": "payroll-7f9"}], [8, {"container.id": "d"}]],
    }
    r.apply_heartbeat(hb)
    assert hb["host"]["host.name"] == "node.corp" and hb["host"]["host.id"] == "payroll-1"
    assert hb["containers"] == [
        [7, {"container.id": "c", "k8s.pod.name": "app-7f9"}],
        [8, {"container.id": "d"}],
    ]
    assert hb["host"]["os.version"] == "v" * 1024
    assert decode_heartbeat(encode_heartbeat(hb))["host"] == hb["host"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (rule("heartbeat", "host.id", "x"), "agent.redact[0].field = 'host.id': a heartbeat's redactable"),
        (rule("heartbeat", "boot.id", "x"), "host.id and boot.id identify the host"),
        (rule("file_created", "certain", "x"), "file_created's certain is true or false"),
        (rule("tcp_retransmit", "family", "x"), "is one of ipv4, ipv6, which carries nothing to mask"),
        # (the wire holds a delta's count to the sum of its buckets)
        (rule("histogram_delta", "count", "7"), "'count': a histogram_delta's count and buckets are numbers"),
        (rule("histogram_delta", "buckets", "7"), "'buckets': a histogram_delta's count and buckets are"),
    ],
)
def test_rules_with_nothing_to_mask_or_an_identity_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Redactor([bad])
