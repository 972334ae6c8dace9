"""The C event structs and the Python decoders agree (docs/design.md, principle 9),
and the decoders turn known bytes into known wire events.

Compiles a tiny program against the probe headers with the host's gcc and
compares sizeof/offsetof with the decoder's struct layout.
"""

import os
import shutil
import subprocess

import pytest

from edge_agent import probes
from ktel.probes import (
    HIST_SLOTS,
    PROBES,
    Layout,
    block_latency,
    dns_latency,
    file_created,
    ktel_api,
    module_load,
    oom_kill,
    process,
    skb_drop,
    syscall_latency,
    tcp_retransmit,
)
from ktel.probes.decode import PackedEvents, block_device_name, frame, pack_event, taint_letters
from ktel.wire import FILE_CREATED, KINDS, event_dict


def c_numbers(tmp_path, header: str, exprs: list[str]) -> list[int]:
    """The values of C size expressions, compiled with ``header`` (from bpf/) by gcc."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    src = tmp_path / "layout.c"
    prints = "".join(f'printf("%zu\\n", (size_t)({e}));' for e in exprs)
    src.write_text(
        f'#include <stddef.h>\n#include <stdio.h>\n#include "{header}"\n'
        f"int main(void) {{ {prints} return 0; }}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{probes.BPF_DIR}", "-o", exe, src], check=True)
    return [int(x) for x in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split()]


def c_layout(tmp_path, header: str, struct: str, fields: list[str]) -> list[int]:
    """sizeof the struct, then the offset of each field."""
    return c_numbers(
        tmp_path, header, [f"sizeof(struct {struct})", *(f"offsetof(struct {struct}, {f})" for f in fields)]
    )


def test_counter_and_knob_indices_match_header():
    text = (probes.BPF_DIR / "ktel_common.h").read_text()
    assert f"KTEL_COUNTER_RINGBUF_DROPS = {probes.COUNTER_RINGBUF_DROPS}," in text
    assert f"KTEL_COUNTER_SAMPLED_OUT = {probes.COUNTER_SAMPLED_OUT}," in text
    assert f"KTEL_COUNTER_INFLIGHT_LOST = {probes.COUNTER_INFLIGHT_LOST}," in text
    assert f"KTEL_COUNTER_NEGATIVE_LATENCY = {probes.COUNTER_NEGATIVE_LATENCY}," in text
    assert f"KTEL_COUNTER_PATH_TRUNCATED = {probes.COUNTER_PATH_TRUNCATED}," in text
    assert f"KTEL_COUNTER_PATH_UNRESOLVED = {probes.COUNTER_PATH_UNRESOLVED}," in text
    assert f"KTEL_COUNTER_MAX = {max(probes.KERNEL_COUNTERS.values()) + 1}," in text
    assert f"KTEL_KNOB_SAMPLE_EVERY = {probes.KNOB_SAMPLE_EVERY}," in text


# Every struct every registered probe declares: a probe added to ktel/probes/ is
# checked here without a line of this file changing.
LAYOUTS = [(name, layout) for name, p in PROBES.items() for layout in p.layouts]


@pytest.mark.parametrize(("probe", "layout"), LAYOUTS, ids=[f"{n}-{la.c_struct}" for n, la in LAYOUTS])
def test_probe_struct_layout_matches_decoder(tmp_path, probe: str, layout: Layout):
    offsets = layout.offsets()
    size, *got = c_layout(tmp_path, layout.header, layout.c_struct, list(offsets))
    assert size == layout.struct.size
    assert dict(zip(offsets, got, strict=True)) == offsets


def test_every_probe_with_events_declares_its_layout_and_source():
    for name, p in PROBES.items():
        assert (probes.BPF_DIR / f"{name}.bpf.c").is_file(), name
        if p.ringbuf:
            assert p.layouts, f"probe {name} sends events but declares no C layout to check"


def test_layout_offsets_follow_the_struct_format():
    import struct

    layout = Layout("x.h", "x", struct.Struct("<QIB3x16s2H"), ("a", "b", "c", "d", "e", "f"))
    assert layout.offsets() == {"a": 0, "b": 8, "c": 12, "d": 16, "e": 32, "f": 34}


def test_file_created_offsets_are_the_documented_ones():
    assert PROBES["file_created"].layouts[0].offsets() == {
        "ts_ns": 0,
        "pid": 8,
        "tid": 12,
        "uid": 16,
        "dirfd": 20,
        "flags": 24,
        "certain": 28,
        "dir_state": 29,
        "dir_len": 30,
        "comm": 32,
        "path": 48,
        "dir": 304,
    }


def test_oom_kill_names_after_the_counters(tmp_path):
    _size, *got = c_layout(tmp_path, "oom_kill.h", "oom_kill_event", ["has_detail", "comm", "trigger_comm"])
    assert got == [62, 64, 80]


def test_file_created_records_without_dir_end_where_dir_begins(tmp_path):
    """The size the kernel side reserves for a record without dir, compiled from the
    header the BPF program, the kmod filewatcher's reader and the packer use."""
    [layout] = PROBES["file_created"].layouts
    assert layout.offsets()["dir"] == file_created.ABS_SIZE == 304
    assert c_numbers(tmp_path, "file_created.h", ["KTEL_FILE_CREATED_ABS_SIZE"]) == [file_created.ABS_SIZE]


def test_file_created_dir_state_values_are_the_headers(tmp_path):
    names = ["KTEL_DIR_OK", "KTEL_DIR_IN_ROOT", "KTEL_PATH_TRUNCATED"]
    want = [file_created.DIR_OK, file_created.DIR_IN_ROOT, file_created.PATH_TRUNCATED]
    assert c_numbers(tmp_path, "file_created.h", names) == want


def test_file_created_dirfd_of_no_directory_is_the_headers(tmp_path):
    """KTEL_DIRFD_NONE, the filewatcher records' dirfd: negative, and not AT_FDCWD."""
    assert c_numbers(tmp_path, "file_created.h", ["-(KTEL_DIRFD_NONE)"]) == [-file_created.DIRFD_NONE]
    assert file_created.DIRFD_NONE < 0 and file_created.DIRFD_NONE != file_created.AT_FDCWD


# The BPF helpers ktel_tracepoints.bpf.h calls, for a program compiled by gcc.
TP_HELPERS = r"""
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/types.h>
#define __always_inline inline __attribute__((always_inline))
static __u64 pid_tgid;
static __u64 bpf_get_current_pid_tgid(void) { return pid_tgid; }
static __u64 bpf_get_current_uid_gid(void) { return 0; }
static __u64 bpf_ktime_get_ns(void) { return 5; }
static long bpf_probe_read_kernel_str(void *dst, __u32 size, const void *src)
{
	size_t n = strnlen(src, size - 1);

	memcpy(dst, src, n);
	((char *)dst)[n] = 0;
	return (long)n + 1;
}
#include "ktel_tracepoints.bpf.h"
"""


def filewatcher_record(tmp_path, pid: int, path: bytes) -> bytes:
    """The record the agent's program makes of a filewatcher:file_created event of
    ``pid`` creating ``path`` (kmod/README.md's layout), by ktel_tp_file_created."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    src = tmp_path / "filewatcher.c"
    src.write_text(
        TP_HELPERS
        + r"""
int main(int argc, char **argv)
{
	struct {
		struct filewatcher_ctx ctx;
		char data[256];
	} tp = {0};
	struct file_created_event ev;
	size_t len = strlen(argv[2]) + 1;

	tp.ctx.pid = atoi(argv[1]);
	pid_tgid = (__u64)tp.ctx.pid << 32 | (__u32)tp.ctx.pid;
	strcpy(tp.ctx.comm, "sh");
	tp.ctx.flags = 0100;
	memcpy(tp.data, argv[2], len);
	tp.ctx.path = (__u32)(len << 16 | offsetof(typeof(tp), data));
	memset(&ev, 0xaa, sizeof(ev));
	ktel_tp_file_created(&ev, &tp.ctx);
	fwrite(&ev, 1, KTEL_FILE_CREATED_ABS_SIZE, stdout);
	return 0;
}
"""
    )
    exe = tmp_path / "filewatcher"
    subprocess.run(["gcc", f"-I{probes.BPF_DIR}", "-o", exe, src], check=True)
    return subprocess.run([exe, str(pid), path], capture_output=True, check=True).stdout


def test_a_path_filewatcher_could_not_name_is_sent_as_the_module_gave_it(tmp_path):
    """filewatcher's "(d_path failed)" (kmod/README.md), not absolute, in the record
    ktel_tp_file_created makes of it, from a process that lives on with a readable cwd
    (this one): the module's text, not a path made up from the cwd the process has
    moved to since, whoever packs it."""
    assert os.readlink(f"/proc/{os.getpid()}/cwd")  # what a resolve would join it with
    for path in ("(d_path failed)", "/tmp/fw/file"):
        rec = filewatcher_record(tmp_path, os.getpid(), path.encode())
        assert len(rec) == file_created.ABS_SIZE
        data = frame(rec)[1]
        [event] = file_created.decode_run(file_created.ABS_SIZE, data, 0)
        assert event[2] == os.getpid() and event[5:] == ["sh", path, 0o100, True]
        packed = PackedEvents()
        file_created.pack_run(file_created.ABS_SIZE, data, 0, packed)
        assert list(packed) == [pack_event(event)]


def test_a_path_resolved_past_its_bound_is_sent_as_the_caller_passed_it(monkeypatch):
    """A relative path resolved against a cwd deep in names that are not UTF-8, each
    byte escaped in 4 characters: past the path field's bound the event is not valid,
    and the processors refused its whole batch, which any user of the node could make
    happen at every batch. It goes as the caller passed it; a cwd within the bound
    still resolves it."""
    deep = b"/" + b"/".join([b"\xff" * 255] * 15) + b"/" + b"\xff" * 254  # (4,095 bytes)
    passed = "\\xff" * 255
    monkeypatch.setattr(file_created.os, "readlink", lambda _link: deep)
    resolved = file_created._resolve(passed, 42, file_created.AT_FDCWD)
    assert resolved == passed
    assert FILE_CREATED.valid([FILE_CREATED.id, 1, 42, 42, 0, "sh", resolved, 0o100, False])
    monkeypatch.setattr(file_created.os, "readlink", lambda _link: b"/home/u")
    assert file_created._resolve("f", 42, file_created.AT_FDCWD) == "/home/u/f"


def test_every_probes_own_kernel_counters_are_known_to_the_agent():
    assert {c for p in PROBES.values() for c in p.kernel_counters} <= probes.KERNEL_COUNTERS.keys()
    assert PROBES["file_created"].kernel_counters == ("truncated_paths", "unresolved_paths")


def test_process_exit_records_are_the_head_of_an_exec_record():
    # "<QQIIIIIii4x16s": the 64-byte head an exit record has, then the exec's filename.
    assert PROBES["process"].layouts[0].offsets()["filename"] == process.LAYOUT.size == 64
    assert PROBES["process"].layouts[0].struct.size == process.EXEC_SIZE
    text = (probes.BPF_DIR / "process.h").read_text()
    assert f"#define KTEL_PROCESS_EXIT_SIZE {process.LAYOUT.size}" in text
    assert "KTEL_PROCESS_EXEC = 1," in text and "KTEL_PROCESS_EXIT = 2," in text
    assert (process.TYPE_EXEC, process.TYPE_EXIT) == (1, 2)


def test_histogram_value_layout_matches_agent(tmp_path):
    size, slots, total = c_layout(tmp_path, "ktel_hist.h", "ktel_hist", ["slots", "sum"])
    assert (size, slots, total) == (8 * probes.HIST_WORDS, 0, 8 * HIST_SLOTS)
    assert f"#define KTEL_HIST_SLOTS {HIST_SLOTS}" in (probes.BPF_DIR / "ktel_hist.h").read_text()


def test_histogram_buckets_are_log2_of_the_value(tmp_path):
    """ktel_hist_slot() as compiled: bucket i holds [2^i, 2^(i+1)), 0 and 1 in
    bucket 0, everything from 2^39 in the last one."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    values = [0, 1, 2, 3, 4, 7, 8, 1023, 1024, 10**6, 2**32 - 1, 2**32, 2**39 - 1, 2**39, 2**63, 2**64 - 1]
    src = tmp_path / "slot.c"
    src.write_text(
        '#include <stdio.h>\n#include "ktel_hist.h"\nint main(void) {\n'
        + "".join(f'printf("%u\\n", ktel_hist_slot({v}ULL));\n' for v in values)
        + "return 0; }\n"
    )
    exe = tmp_path / "slot"
    subprocess.run(["gcc", f"-I{probes.BPF_DIR}", "-o", exe, src], check=True)
    got = [int(x) for x in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [min(max(v.bit_length() - 1, 0), HIST_SLOTS - 1) for v in values]


# Test vectors: known bytes -> known wire events.


def test_decoders_turn_known_bytes_into_wire_events():
    raw = tcp_retransmit.LAYOUT.pack(
        5, 1, -11, 2, 40000, 8080, 1, bytes([10, 0, 0, 1]) + bytes(12), bytes([10, 0, 0, 2]) + bytes(12)
    )
    assert event_dict(tcp_retransmit.decode(raw, 100)) == {
        "kind": "tcp_retransmit",
        "ts_ns": 105,
        "family": "ipv4",
        "saddr": "10.0.0.1",
        "sport": 40000,
        "daddr": "10.0.0.2",
        "dport": 8080,
        "state": "ESTABLISHED",
        "err": -11,
    }
    v6 = tcp_retransmit.LAYOUT.pack(5, 2, 0, 10, 1, 2, 0, bytes(15) + b"\1", bytes(15) + b"\1")
    assert tcp_retransmit.decode(v6, 0)[2:] == ["ipv6", "::1", 1, "::1", 2, "SYN_SENT", None]

    head = process.LAYOUT.pack(7, 99, 1, 10, 11, 1, 0, -1, 0, b"true")
    assert event_dict(process.decode(head + b"/usr/bin/true\0".ljust(256, b"x"), 0)) == {
        "kind": "process_exec",
        "ts_ns": 7,
        "pid": 10,
        "tid": 11,
        "ppid": 1,
        "uid": 0,
        "cgroup_id": 99,
        "comm": "true",
        "filename": "/usr/bin/true",
    }
    exited = process.LAYOUT.pack(7, 99, 2, 10, 10, 1, 0, 3, 0, b"sh")
    killed = process.LAYOUT.pack(7, 99, 2, 10, 10, 1, 0, -1, 15, b"sleep")
    assert process.decode(exited, 0)[-2:] == [3, 0]
    assert process.decode(killed, 0)[-2:] == [None, 15]

    drop = skb_drop.LAYOUT.pack(1, 0xFFFF, 42, 3, 0x0800, b"nc")
    ev = event_dict(skb_drop.decode(drop, 0))
    assert (ev["pid"], ev["comm"], ev["protocol"], ev["reason"], ev["location"]) == (
        42,
        "nc",
        0x0800,
        3,
        0xFFFF,
    )

    slow = dns_latency.SLOW.pack(3, 250_000_000, 8, 9, -2, b"curl", b"example.org")
    assert dns_latency.decode(slow, 1)[1:] == [4, 8, 9, "curl", "example.org", 250_000_000, -2]
    assert dns_latency.labels(dns_latency.KEY.pack(8, 1, b"curl")) == {
        "process.pid": 8,
        "process.executable.name": "curl",
        "status": "error",
    }
    assert block_latency.labels(block_latency.KEY.pack((259 << 20) | 3, ord("W"))) == {
        "device": block_device_name(259, 3),
        "device.major": 259,
        "device.minor": 3,
        "op": "write",
    }
    assert syscall_latency.labels(syscall_latency.KEY.pack(1234, 0))["cgroup.id"] == 1234

    oom = oom_kill.LAYOUT.pack(1, 2, 3, 4, 5, 6, 77, 1000, 88, -500, 1, b"hog", b"hog")
    assert oom_kill.decode(oom, 0)[2:] == [77, "hog", 1000, 2, 3, 4, 5, 6, -500, 88, "hog"]
    bare = oom_kill.LAYOUT.pack(1, 0, 0, 0, 0, 0, 77, 0, 88, 0, 0, b"", b"hog")
    assert oom_kill.decode(bare, 0)[2:] == [77, "", None, None, None, None, None, None, None, 88, "hog"]


def test_module_load_names_the_module_and_its_taint_flags():
    raw = module_load.LAYOUT.pack(5, 42, 1 << 12 | 1 << 13, b"insmod", b"ktel_sample")
    ev = module_load.decode(raw, 10)
    assert event_dict(ev) == {
        "kind": "module_load",
        "ts_ns": 15,
        "pid": 42,
        "comm": "insmod",
        "name": "ktel_sample",
        "taints": 0x3000,
        "taint_flags": "OE",
    }
    assert KINDS[ev[0]].valid(ev)
    assert taint_letters(0) == "" and taint_letters(1) == "P" and taint_letters(1 << 18) == "N"


def _kv(*pairs: str) -> bytes:
    return b"".join(p.encode().ljust(ktel_api.STR, b"\0") for p in pairs).ljust(512, b"\0")


def test_ktel_api_records_decode_to_metric_span_and_log_events():
    text = (probes.BPF_DIR / "ktel_api.h").read_text()
    for name, value in (("COUNTER", 1), ("GAUGE", 2), ("HISTOGRAM", 3), ("SPAN_END", 4), ("LOG", 5)):
        assert f"KTEL_API_{name} = {value}," in text
        assert getattr(ktel_api, name) == value
    tid = bytes(range(1, 17))

    def rec(
        kind,
        value=0,
        span=0,
        parent=0,
        start=0,
        end=0,
        level=0,
        nr=0,
        trace=bytes(16),
        name=b"",
        kv=b"",
        msg=b"",
    ):
        return ktel_api.LAYOUT.pack(
            1000, value, span, parent, start, end, 7, 8, kind, level, nr, trace, name, kv or _kv(), msg
        )

    counter = rec(ktel_api.COUNTER, 3, nr=1, name=b"x_total", kv=_kv("result", "ok", "ignored", "slot"))
    assert event_dict(ktel_api.decode(counter, 5)) == {
        "kind": "ktel_metric",
        "ts_ns": 1005,
        "pid": 7,
        "type": "counter",
        "name": "x_total",
        "labels": {"result": "ok"},
        "value": 3,
    }
    gauge = rec(ktel_api.GAUGE, -4, name=b"g")
    assert ktel_api.decode(gauge, 0)[3:] == ["gauge", "g", {}, -4]
    # ktel:ktel_histogram's value is a u64: one from 2^63 up (here 2^64 - 1) is no
    # negative observation, but the largest the wire's int64 holds, in the top bucket.
    for observed in (5, 2**63 - 1, 2**63, 2**64 - 1):
        raw = rec(ktel_api.HISTOGRAM, observed - (1 << 64 if observed >= 1 << 63 else 0), name=b"h_ns")
        ev = ktel_api.decode(raw, 0)
        assert ev[3:] == ["histogram", "h_ns", {}, min(observed, 2**63 - 1)]
        assert KINDS[ev[0]].valid(ev)
    span = rec(ktel_api.SPAN_END, span=0x0102030405060708, parent=0, start=10, end=30, level=2, nr=2,
               trace=tid, name=b"op", kv=_kv("a", "1", "b", "2"))  # fmt: skip
    assert event_dict(ktel_api.decode(span, 100)) == {
        "kind": "ktel_span",
        "ts_ns": 1100,
        "pid": 7,
        "tid": 8,
        "trace_id": tid,
        "span_id": bytes([1, 2, 3, 4, 5, 6, 7, 8]),
        "parent_span_id": b"",
        "name": "op",
        "start_ns": 110,
        "end_ns": 130,
        "status": 2,
        "attrs": {"a": "1", "b": "2"},
    }
    child = rec(ktel_api.SPAN_END, span=9, parent=0xABCDEF, trace=tid, name=b"c")
    assert ktel_api.decode(child, 0)[6] == (0xABCDEF).to_bytes(8, "big")
    log = rec(ktel_api.LOG, span=9, level=13, nr=1, trace=tid, kv=_kv("k", "v"), msg=b"took 5 ns")
    assert ktel_api.decode(log, 0)[4:] == [13, "took 5 ns", {"k": "v"}, tid, (9).to_bytes(8, "big")]
    bare = rec(ktel_api.LOG, level=9, msg=b"no span")
    assert ktel_api.decode(bare, 0)[-2:] == [b"", b""]
    with pytest.raises(ValueError, match="unknown kind 6"):
        ktel_api.decode(rec(ktel_api.SPAN_BEGIN), 0)


def test_skb_drop_reason_names_come_from_the_print_fmt():
    # As v6.18 writes it (TRACE_DEFINE_ENUM resolves the names to numbers) ...
    fmt = (
        'print fmt: "... reason: %s", REC->skbaddr, __print_symbolic(REC->reason, '
        '{ 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 0x4, "SOCKET_CLOSE" })'
    )
    assert skb_drop.reason_names(fmt) == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 4: "SOCKET_CLOSE"}
    # ... and a kernel that left a symbol unresolved: that pair is skipped.
    assert skb_drop.reason_names('__print_symbolic(REC->reason, { SKB_X, "X" }, { 1, "Y" })') == {1: "Y"}
    assert skb_drop.reason_names("no reason here") == {}
