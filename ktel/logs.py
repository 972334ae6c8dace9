"""How every ktel process logs: one ``logging.config.dictConfig`` dictionary, which
the CLI applies and hands to Faust's worker (which otherwise installs its own).

``service.log_format``: ``text`` is one readable line per record; ``json`` one JSON
object per line (python-json-logger), with ``time``, ``level``, ``logger`` and
``message``, plus whatever a record carries in ``extra``, for log pipelines.
"""

from __future__ import annotations

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
