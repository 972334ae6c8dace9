"""The C event structs and the Python decoders agree (design principle 9).

Compiles a tiny program against the probe headers with the host's gcc and
compares sizeof/offsetof with the decoder's struct layout.
"""

import shutil
import subprocess

import pytest

from edge_agent import file_created, probes

FIELDS = ["ts_ns", "pid", "tid", "uid", "dirfd", "flags", "certain", "comm", "path"]


def c_layout(tmp_path, header: str, struct: str, fields: list[str]) -> list[int]:
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    src = tmp_path / "layout.c"
    prints = "".join(f'printf("%zu\\n", offsetof(struct {struct}, {f}));' for f in fields)
    src.write_text(
        f'#include <stddef.h>\n#include <stdio.h>\n#include "{header}"\n'
        f'int main(void) {{ printf("%zu\\n", sizeof(struct {struct})); {prints} return 0; }}\n'
    )
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{probes.BPF_DIR}", "-o", exe, src], check=True)
    return [int(x) for x in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split()]


def test_file_created_layout_matches_decoder(tmp_path):
    size, *offsets = c_layout(tmp_path, "file_created.h", "file_created_event", FIELDS)
    assert size == file_created.LAYOUT.size
    # Offsets implied by the struct format "<QIIIiIB3x16s256s".
    assert offsets == [0, 8, 12, 16, 20, 24, 28, 32, 48]


def test_counter_and_knob_indices_match_header():
    text = (probes.BPF_DIR / "ktel_common.h").read_text()
    assert f"KTEL_COUNTER_RINGBUF_DROPS = {probes.COUNTER_RINGBUF_DROPS}," in text
    assert f"KTEL_COUNTER_SAMPLED_OUT = {probes.COUNTER_SAMPLED_OUT}," in text
    assert f"KTEL_KNOB_SAMPLE_EVERY = {probes.KNOB_SAMPLE_EVERY}," in text
