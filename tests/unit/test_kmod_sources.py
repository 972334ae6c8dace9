"""ktel's kernel modules (kmod/) build for every kernel they claim: filewatcher.c's
LINUX_VERSION_CODE range, 6.1 to 6.18. tests/vm builds and boots them against the
newest headers installed (Debian 12's 6.1), so what only later kernels refuse is
checked here, from the sources."""

import re

from tests.vm.qemu_harness import KMOD

# The trace-event macros that copy a string into a __string()/__string_len() field
# changed form within that range: 6.1's __assign_str_len(item, src, len) is gone
# from later kernels, and __assign_str() took two arguments before 6.10 and one
# since (6.12's include/trace/stages/stage6_event_callback.h). A trace header
# copies through __get_str() and __get_dynamic_array_len(), which every one has.
CHANGED = re.compile(r"\b(?:__assign_str_len|__assign_str|__assign_rel_str)\s*\(")
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)


def test_trace_headers_copy_strings_the_same_way_on_every_kernel_they_build_for():
    sources = sorted(KMOD.glob("*.[ch]")) + sorted((KMOD / "include").rglob("*.h"))
    assert any(p.name == "ktel_trace.h" for p in sources)
    used = {p.name: CHANGED.findall(COMMENT.sub("", p.read_text())) for p in sources}
    assert not {name: calls for name, calls in used.items() if calls}, (
        "not built by every kernel of 6.1 to 6.18"
    )
