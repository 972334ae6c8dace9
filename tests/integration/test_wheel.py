"""The wheel stands on its own: built from this checkout and installed in a fresh venv
outside it, ktel runs and finds the files it ships (BPF programs, kernel-module sources,
the local stack's manifests) inside that venv, without BCC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktel.probes import PROBES

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[2]

# Run by the venv's python: where the installed ktel finds its files.
WHERE = """
import json, ktel
from edge_agent import probes
from ktel.paths import DATA_DIR
from ktel.probes import PROBES, file_created
from ktel.stack import kafka, otelcol
for name in PROBES:
    probes.bpf_source(name)  # raises if the program or the header it is compiled after is missing
print(json.dumps({
    "ktel": ktel.__file__,
    "programs": [str(probes.BPF_DIR / f"{name}.bpf.c") for name in PROBES],
    "bpf": str(probes.BPF_DIR),
    "kmod": str(DATA_DIR / "kmod"),
    "manifests": [str(kafka._POM), str(otelcol.MANIFEST)],
    "packer": file_created._native and file_created._native.__file__,  # compiled into the wheel
}))
"""


def run(argv: list[str | Path], **kwargs) -> str:
    # The timeout only keeps a hung pip from hanging the suite.
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=1200, **kwargs)
    assert res.returncode == 0, f"{argv} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def sources(root: Path, patterns: tuple[str, ...]) -> set[str]:
    return {str(p.relative_to(root)) for pattern in patterns for p in root.glob(pattern) if p.is_file()}


def test_the_installed_wheel_runs_and_finds_what_it_ships(tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    # pip builds a local directory in place (build/, *.egg-info): build a copy, so the
    # checkout is left as it was. symlinks=True keeps ktel/_data/'s links relative.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", src])
    [wheel] = (tmp_path / "dist").glob("ktel-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    run([venv / "bin/python", "-m", "pip", "install", "-q", wheel])  # dependencies from the index

    # Nothing may point back at the checkout or configure ktel: a clean environment.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("KTEL_")
    }
    home = tmp_path / "elsewhere"  # the working directory, outside the checkout
    home.mkdir()

    def ktel(*args: str) -> str:
        return run([venv / "bin/ktel", *args], cwd=home, env=env)

    assert "probes" in ktel("--help")
    assert json.loads(ktel("config"))["kafka"]["bootstrap"]
    assert [ln.split(":")[0] for ln in ktel("probes").splitlines()] == list(PROBES)

    where = json.loads(run([venv / "bin/python", "-c", WHERE], cwd=home, env=env))
    assert where["packer"], "the wheel lacks the compiled packer (setup.py's extension)"
    files = [where["ktel"], *where["programs"], *where["manifests"], where["packer"]]
    for f in files:
        path = Path(f).resolve()
        assert path.is_file() and path.is_relative_to(venv.resolve()), f
    assert sources(Path(where["bpf"]), ("*.c", "*.h")) == sources(ROOT / "bpf", ("*.c", "*.h"))
    kmod = ("Kbuild", "Makefile", "**/*.c", "**/*.h")
    assert sources(Path(where["kmod"]), kmod) == sources(ROOT / "kmod", kmod)
    assert Path(where["kmod"]).resolve().is_relative_to(venv.resolve())
