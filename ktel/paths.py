"""Where ktel finds files outside itself."""

from __future__ import annotations

from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
