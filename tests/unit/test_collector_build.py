"""The Collector's build keeps Go's temporary files in a directory of its own under the
cache, emptied before each build: Go removes its ``go-build*`` work directory only on a
clean exit, and a build killed (`ktel down`, Ctrl-C during `ktel up`) left it in
$TMPDIR for good."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from ktel.stack import otelcol

GO = "/opt/go/bin/go"


class Killed(BaseException):
    """A stop signal's handler that raises (`ktel up`'s while it starts)."""


def test_a_killed_builds_go_files_are_removed_by_the_next_build(tmp_path, monkeypatch):
    monkeypatch.setattr(otelcol, "find_go", lambda _root: GO)
    # Each run: the go command's temporary directory and what was in it as it started.
    runs: list[tuple[Path, list[str]]] = []
    kill = True

    def run(
        argv: Sequence[str],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        assert env is not None and cwd is not None
        tmp = Path(env["GOTMPDIR"])
        runs.append((tmp, sorted(p.name for p in tmp.iterdir())))
        work = tmp / f"go-build{len(runs)}"
        work.mkdir()
        (work / "b001").mkdir()
        if kill:  # killed mid-build, its work directory left
            raise Killed
        work.joinpath("b001").rmdir()
        work.rmdir()  # a clean exit removes it
        if argv[0] != GO:  # the builder: the Collector built
            binary = cwd / "build" / otelcol.BINARY_NAME
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(otelcol.proc, "run", run)
    with pytest.raises(Killed):
        otelcol.ensure_collector(tmp_path)
    kill = False
    binary = otelcol.ensure_collector(tmp_path)
    tmp = binary.parent.parent / "gotmp"
    assert tmp.is_absolute()
    # The killed build's go-build1 gone before the next build's first go command ran.
    assert runs == [(tmp, []), (tmp, []), (tmp, [])]
    assert list(tmp.iterdir()) == []
