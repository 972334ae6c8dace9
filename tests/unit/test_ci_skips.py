"""tests/conftest.py under CI=true: every way a test can pass without running what it
checks is a failure. A run of pytest of its own, on tests written here, with that
conftest as its plugin and CI=true: a skip in the test, in a fixture or by marker, a
module skipped as it is collected (pytest.skip(allow_module_level=True), a module-level
importorskip), and an xfail, failing or passing, each fail the run; a test that passes
still passes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "skip_in_test": """
        import pytest
        def test_it():
            pytest.skip("no capability")
    """,
    "skip_in_fixture": """
        import pytest
        @pytest.fixture
        def cap():
            pytest.skip("no capability")
        def test_it(cap):
            pass
    """,
    "skipif_marker": """
        import pytest
        @pytest.mark.skipif(True, reason="no capability")
        def test_it():
            pass
    """,
    "module_skip": """
        import pytest
        pytest.skip("no capability", allow_module_level=True)
        def test_it():
            pass
    """,
    "module_importorskip": """
        import pytest
        pytest.importorskip("ktel_no_such_module")
        def test_it():
            pass
    """,
    "xfail_marker_failing": """
        import pytest
        @pytest.mark.xfail(reason="known broken")
        def test_it():
            assert False
    """,
    "xfail_marker_passing": """
        import pytest
        @pytest.mark.xfail(reason="known broken")
        def test_it():
            pass
    """,
    "xfail_imperative": """
        import pytest
        def test_it():
            pytest.xfail("known broken")
    """,
}


PASSING = "def test_it():\n    assert 1 + 1 == 2\n"


def run_pytest(tmp_path: Path, ci: str) -> dict[str, str]:
    """Each case's outcome as the run's summary gives it (-rA), and the run's output (under
    ""). A module that fails in its collection stops a run; here the others run on."""
    for name, source in {**CASES, "passing": PASSING}.items():
        (tmp_path / f"test_{name}.py").write_text(textwrap.dedent(source))
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
        + ["-rA", "--continue-on-collection-errors", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outcomes: dict[str, str] = {}
    summary = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) .*?test_(\w+?)\.py", r.stdout, re.M)
    for outcome, name in summary:
        outcomes.setdefault(name, outcome)
    return outcomes | {"": r.stdout + r.stderr}


def test_under_ci_a_test_that_did_not_run_what_it_checks_fails_the_run(tmp_path):
    got = run_pytest(tmp_path, ci="true")
    out = got.pop("")
    # A failure in a test's setup or a module's collection is an ERROR, in its call a FAILED.
    failed = {name for name, outcome in got.items() if outcome in ("FAILED", "ERROR")}
    assert failed == set(CASES) and got["passing"] == "PASSED", out
    assert out.count("under CI=true, which counts as a failure") >= len(CASES), out


def test_outside_ci_a_skip_or_an_xfail_is_reported_not_failed(tmp_path):
    got = run_pytest(tmp_path, ci="")
    out = got.pop("")
    assert "counts as a failure" not in out, out
    assert got == {
        "skip_in_test": "SKIPPED",
        "skip_in_fixture": "SKIPPED",
        "skipif_marker": "SKIPPED",
        "module_skip": "SKIPPED",
        "module_importorskip": "SKIPPED",
        "xfail_marker_failing": "XFAIL",
        "xfail_marker_passing": "XPASS",
        "xfail_imperative": "XFAIL",
        "passing": "PASSED",
    }, out
