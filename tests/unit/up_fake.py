"""`ktel up` run in the test's own process, as test_up_interrupt.py and test_down.py run
it: a stack of the test's own data dir, whose children are stand-ins the test gives."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ktel import config, up


def stack_config(data_dir: Path) -> config.Config:
    return config.Config(agent=config.AgentConfig(host_id="h"), stack=config.StackConfig(data_dir=data_dir))


def fake_stack(monkeypatch: pytest.MonkeyPatch, **methods: Callable[..., Any]) -> None:
    """``up.Stack`` with ``methods`` (start, wait_ready, stop) in place of its own."""
    for name, method in methods.items():
        monkeypatch.setattr(up.Stack, name, method)


def run_up(cfg: config.Config) -> int:
    """``up.run``, the SIGINT and SIGTERM handlers it sets put back after: the test
    process' own, which the tests after it need."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        return up.run(cfg)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
