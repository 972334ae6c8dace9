"""How every ktel process logs: one ``logging.config.dictConfig`` dictionary, which
the CLI applies and hands to Faust's worker (which otherwise installs its own).

``service.log_format``: ``text`` is one readable line per record; ``json`` one JSON
object per line (python-json-logger), with ``time``, ``level``, ``logger`` and
``message``, plus whatever a record carries in ``extra``, for log pipelines.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def config(level: str, log_format: str) -> dict[str, Any]:
    if log_format == "json":
        formatter: dict[str, Any] = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    else:
        formatter = {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ktel": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "ktel"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        # One line per HTTP request would drown ktel's own messages.
        "loggers": {"httpx": {"level": "WARNING"}},
    }


class Once:
    """Which subjects of a warning were logged: each once, and no more than ``limit`` of
    them, so that a flood of bad items (a writer of ktel's topics may send ever new
    ones) costs a bounded number of log lines. What each such warning is about is
    counted in a metric besides, so a line not written loses no count."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self.seen: set[Hashable] = set()

    def __call__(self, subject: Hashable) -> bool:
        """Whether to log about ``subject`` now: the first time, while the bound allows."""
        if len(self.seen) >= self.limit or subject in self.seen:
            return False
        self.seen.add(subject)
        return True
