"""Redaction at the edge: configured rules mask values before a batch is sealed,
so nothing sensitive reaches the spool or Kafka."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ktel.config import ConfigError, RedactRule
from ktel.wire import KINDS


class Redactor:
    def __init__(self, rules: Sequence[RedactRule]):
        by_name = {k.name: k for k in KINDS.values()}
        self.by_kind: dict[int, list[tuple[int, re.Pattern[str], str]]] = {}
        for i, r in enumerate(rules):
            kind = by_name.get(r.kind)
            if kind is None:
                raise ConfigError(
                    f"agent.redact[{i}].kind = {r.kind!r}: unknown event kind (known: {', '.join(by_name)})"
                )
            if r.field not in kind.fields:
                raise ConfigError(
                    f"agent.redact[{i}].field = {r.field!r}: {r.kind} has no such field "
                    f"(fields: {', '.join(kind.fields)})"
                )
            # +1: an event array starts with its kind id.
            self.by_kind.setdefault(kind.id, []).append(
                (kind.fields.index(r.field) + 1, re.compile(r.pattern), r.replacement)
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
