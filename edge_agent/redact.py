"""Redaction at the edge: configured rules mask values before a batch is sealed,
so nothing sensitive reaches the spool or Kafka."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ktel.config import ConfigError, RedactRule
from ktel.probes import KIND_BY_NAME


class Redactor:
    def __init__(self, rules: Sequence[RedactRule]):
        self.by_kind: dict[int, list[tuple[int, re.Pattern[str], str]]] = {}
        for i, r in enumerate(rules):
            kind = KIND_BY_NAME.get(r.kind)
            if kind is None:
                raise ConfigError(
                    f"agent.redact[{i}].kind = {r.kind!r}: unknown event kind "
                    f"(known: {', '.join(KIND_BY_NAME)})"
                )
            if r.field not in kind.field_names:
                raise ConfigError(
                    f"agent.redact[{i}].field = {r.field!r}: {r.kind} has no such field "
                    f"(fields: {', '.join(kind.field_names)})"
                )
            self.by_kind.setdefault(kind.id, []).append(
                (kind.index(r.field), re.compile(r.pattern), r.replacement)
            )

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def apply(self, events: list[list]) -> None:
        """Mask in place."""
        rules = self.by_kind
        for ev in events:
            for idx, rx, repl in rules.get(ev[0], ()):
                if isinstance(ev[idx], str):
                    ev[idx] = rx.sub(repl, ev[idx])
