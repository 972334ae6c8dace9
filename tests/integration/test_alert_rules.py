"""ktel's Prometheus rules (deploy/prometheus/): promtool accepts them, and its unit
tests, one at least per alert, pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "deploy/prometheus/ktel-rules.yml"
RULE_TESTS = REPO_ROOT / "deploy/prometheus/ktel-rules.test.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; run deploy/setup.sh)")
    return path


def run(*args: str) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules():
    assert "SUCCESS" in run("check", "rules", str(RULES))


def test_promtool_unit_tests_pass_and_test_every_alert():
    alerts = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case that expects the alert to fire, not only silence
    }
    assert alerts == fired, f"alerts without a test that fires them: {sorted(alerts - fired)}"
    assert "SUCCESS" in run("test", "rules", str(RULE_TESTS))
