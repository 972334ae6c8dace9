"""The agent's systemd unit (deploy/ktel-agent.service): systemd takes it as it is
written, and it starts the agent again for as long as the agent cannot run."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "ktel-agent.service"
KTEL = "/opt/ktel/.venv/bin/ktel"  # where the unit expects ktel installed


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # (systemd's keys are case sensitive)
    parser.read_string(UNIT.read_text())
    return parser


def test_an_agent_that_cannot_start_is_started_again_for_good_every_few_seconds():
    """While an agent started by hand holds the state directory's lock, the unit's agent
    exits at once (status 2). systemd's default start limit, 5 starts in 10 s, gave up
    on it for good: the node had no agent once the other one stopped."""
    u = unit()
    assert u["Service"]["Restart"] == "always"
    assert u["Unit"]["StartLimitIntervalSec"] == "0"  # (in [Service], systemd ignores it)
    # Not every 100 ms, systemd's default, with a start of ktel each time.
    restart_s = u["Service"]["RestartSec"]
    assert restart_s.endswith("s") and int(restart_s.removesuffix("s")) >= 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_takes_the_unit_without_a_warning(tmp_path):
    """A key systemd does not know, or in the wrong section, is only warned about and
    ignored. ``verify`` wants the command to exist: the unit with any executable in
    place of ktel's is checked."""
    text = UNIT.read_text()
    assert f"ExecStart={KTEL} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(KTEL, sys.executable))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
