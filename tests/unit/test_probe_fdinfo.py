"""A probe's programs' recursion_misses, read from the fdinfo of their fds: the runs
the kernel skipped because another BPF program was running on that CPU."""

from edge_agent import probes

# /proc/<pid>/fdinfo/<fd> of a BPF program's fd, as 6.18 shows it.
PROG_FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t1039
prog_type:\t5
prog_jited:\t1
prog_tag:\t3bfbe7cb166a78b0
memlock:\t4096
prog_id:\t7179
run_time_ns:\t0
run_cnt:\t0
recursion_misses:\t37
verified_insns:\t72
"""


def test_a_programs_recursion_misses_are_read_from_its_fdinfo():
    assert probes.recursion_misses(PROG_FDINFO) == 37


def test_a_kernel_without_recursion_misses_in_fdinfo_gives_none_not_zero():
    """Before 5.12 the kernel counts none: no series, rather than a 0 saying none were missed."""
    old = "\n".join(line for line in PROG_FDINFO.splitlines() if not line.startswith("recursion_misses"))
    assert probes.recursion_misses(old) is None


def test_run_time_is_not_taken_for_recursion_misses():
    """Keys are matched whole: no other field ending or starting alike is read."""
    assert probes.recursion_misses("run_cnt:\t5\nrecursion_misses_x:\t9\n") is None
