"""What the BPF programs do with their per-CPU maps, checked from the sources: a lost
increment is a race no test can make happen at will.

A uprobe program runs with migration disabled but preemption enabled
(bpf_prog_run_array_uprobe(), kernels 6.1 and later): on a preemptible kernel another
task's run of it on the same CPU can come between its read and its write of a per-CPU
slot, and one increment is lost. So a probe with uprobes updates nothing in place
with ++, --, +=, -=, |=, &= or ^= (bpf/ktel_common.bpf.h, counters): it adds with
__sync_fetch_and_add(). Tracepoint programs, run with preemption disabled, may.
"""

import re

from edge_agent import probes
from ktel.probes import PROBES

COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
# An update in place of what a pointer points to: (*v)++, *v += n, h->sum += n,
# h->slots[i]++, and their prefix forms. A local variable's (a loop's i++) is not one.
LVALUE = r"(?:\(\s*\*\s*\w+\s*\)|\*\s*\w+|\w+\s*->\s*\w+(?:\s*\[[^\];]*\])*)"
IN_PLACE = re.compile(rf"{LVALUE}\s*(?:\+\+|--|[-+|&^]=)|(?:\+\+|--)\s*{LVALUE}")


def compiled_text(name: str) -> dict[str, str]:
    """The probe's source as the agent compiles it (edge_agent/probes.py: bpf_source)
    and the bpf/ headers it includes, by file, comments left out."""
    files = {"ktel_common.bpf.h": (probes.BPF_DIR / "ktel_common.bpf.h").read_text()}
    files[f"{name}.bpf.c"] = (probes.BPF_DIR / f"{name}.bpf.c").read_text()
    todo = list(files.values())
    while todo:
        for inc in INCLUDE.findall(todo.pop()):
            if inc not in files and (probes.BPF_DIR / inc).is_file():
                files[inc] = (probes.BPF_DIR / inc).read_text()
                todo.append(files[inc])
    return {f: COMMENT.sub("", text) for f, text in files.items()}


def test_the_pattern_finds_updates_in_place_and_not_a_local_counter():
    found = IN_PLACE.findall
    assert found("if (v) (*v)++;") and found("*v += 1;") and found("++*v;")
    assert found("h->slots[ktel_hist_slot(delta)]++;") and found("h->sum += delta;")
    assert not found("for (i = 0; i < n; i++) r |= shift; v >>= r; ev->ts_ns = now;")
    assert not found("__sync_fetch_and_add(&h->slots[ktel_hist_slot(delta)], 1);")


def test_uprobe_programs_update_their_maps_atomically():
    with_uprobes = [p.name for p in PROBES.values() if p.uprobes]
    assert "dns_latency" in with_uprobes
    in_place = {
        (name, f): IN_PLACE.findall(text)
        for name in with_uprobes
        for f, text in compiled_text(name).items()
        if IN_PLACE.search(text)
    }
    assert not in_place, "a preempted uprobe program loses increments: use __sync_fetch_and_add()"
