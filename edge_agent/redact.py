"""Redaction at the edge: configured rules mask values before a batch is sealed or a
heartbeat sent, so nothing sensitive reaches the spool or Kafka.

A rule names an event kind's field, or (kind ``heartbeat``) a heartbeat's host
attribute or container attribute, and masks every match of its pattern in it,
whatever the value's type:

- a string: the matches replaced;
- binary: the same, with the pattern and replacement as UTF-8 bytes;
- a number: the matches replaced in its decimal text, which is read back as a
  number (a replacement that is not one, such as the default ``***``, makes it 0);
- a map or an array (labels, attributes, argv): each value in it, at any depth
  (keys are names, not data, and stay).

The result keeps the wire valid (ktel/wire/): a string cut to its field's length
bound, and a value its field's type still refuses (a fixed-length id, a number out
of range) becomes that type's empty value. Booleans and fields whose values are
one of a fixed set carry nothing to mask; a rule naming one is a config error.
``host.id`` and ``boot.id`` are a heartbeat's identity (its key, the batches'
streams) and cannot be redacted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ktel.config import ConfigError, RedactRule
from ktel.probes import HISTOGRAM_DELTA, KIND_BY_NAME
from ktel.schema import Bool, Bytes, Int, IntList, Map, Str, Type
from ktel.wire.control import HOST_ATTRS, Heartbeat

HEARTBEAT = "heartbeat"
# A heartbeat's host attributes a rule may name (edge_agent/agent.py sends them).
HEARTBEAT_HOST = ("host.name", "host.arch", "os.type", "os.version", "ktel.agent.version")
# Container and pod attributes, in every container a heartbeat lists.
CONTAINER_NAMESPACES = ("container.", "k8s.")
ATTR_STR = Str(1024)  # a heartbeat's host and container attribute values (ktel/wire/control.py)
assert isinstance(HOST_ATTRS.value, Str) and HOST_ATTRS.value.max_len == ATTR_STR.max_len

Mask = Callable[[Any], Any]


class Redactor:
    def __init__(self, rules: Sequence[RedactRule]):
        self.by_kind: dict[int, list[tuple[int, Mask]]] = {}
        self.host: list[tuple[str, Mask]] = []
        self.containers: list[tuple[str, Mask]] = []
        for i, r in enumerate(rules):
            where = f"agent.redact[{i}]"
            if r.kind == HEARTBEAT:
                if r.field in HEARTBEAT_HOST:
                    self.host.append((r.field, masker(r, ATTR_STR, where)))
                elif r.field.startswith(CONTAINER_NAMESPACES):
                    self.containers.append((r.field, masker(r, ATTR_STR, where)))
                else:
                    raise ConfigError(
                        f"{where}.field = {r.field!r}: a heartbeat's redactable fields are "
                        f"{', '.join(HEARTBEAT_HOST)} and container attributes (container.*, k8s.*); "
                        "host.id and boot.id identify the host"
                    )
                continue
            kind = KIND_BY_NAME.get(r.kind)
            if kind is None:
                raise ConfigError(
                    f"{where}.kind = {r.kind!r}: unknown event kind "
                    f"(known: {', '.join(KIND_BY_NAME)}, or {HEARTBEAT})"
                )
            if r.field not in kind.field_names:
                raise ConfigError(
                    f"{where}.field = {r.field!r}: {r.kind} has no such field "
                    f"(fields: {', '.join(kind.field_names)})"
                )
            idx = kind.index(r.field)
            self.by_kind.setdefault(kind.id, []).append((idx, masker(r, kind.fields[idx - 1].type, where)))

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def apply(self, events: list[list]) -> None:
        """Mask events in place."""
        rules = self.by_kind
        for ev in events:
            for idx, mask in rules.get(ev[0], ()):
                ev[idx] = mask(ev[idx])

    def apply_heartbeat(self, hb: Heartbeat) -> None:
        """Mask a heartbeat's host and container attributes in place."""
        host = hb["host"]
        for name, mask in self.host:
            if name in host:
                host[name] = mask(host[name])
        for _cgroup, attrs in hb.get("containers", []) if self.containers else ():
            for name, mask in self.containers:
                if name in attrs:
                    attrs[name] = mask(attrs[name])


def masker(rule: RedactRule, t: Type, where: str) -> Mask:
    """The rule's mask of a value of type ``t``, whose result ``t`` accepts."""
    if isinstance(t, Bool) or (isinstance(t, Str) and t.choices is not None):
        raise ConfigError(
            f"{where}.field = {rule.field!r}: {rule.kind}'s {rule.field} is "
            f"{'true or false' if isinstance(t, Bool) else 'one of ' + ', '.join(sorted(t.choices or ()))}"
            ", which carries nothing to mask: remove the rule"
        )
    if not isinstance(t, Str | Bytes | Int | Map | IntList):
        raise ConfigError(
            f"{where}.field = {rule.field!r}: ktel cannot redact a {type(t).__name__} field yet"
        )
    if rule.kind == HISTOGRAM_DELTA.name and rule.field in ("count", "buckets"):
        # (the wire holds a delta's count to the sum of its buckets: one masked apart from
        # the other would have the processors refuse every batch carrying it)
        raise ConfigError(
            f"{where}.field = {rule.field!r}: a histogram_delta's count and buckets are numbers of "
            "observations, which carry nothing to mask: remove the rule"
        )
    rx, repl = re.compile(rule.pattern), rule.replacement
    try:
        rxb, replb = re.compile(rule.pattern.encode()), repl.encode()
    except re.error as err:
        raise ConfigError(
            f"{where}.pattern = {rule.pattern!r}: not valid for binary values ({err})"
        ) from None

    def walk(v: Any) -> Any:
        if type(v) is str:
            return rx.sub(repl, v)
        if type(v) is bytes:
            return rxb.sub(replb, v)
        if type(v) in (int, float):
            text = repr(v)
            masked = rx.sub(repl, text)
            return v if masked == text else _number(masked, type(v))
        if type(v) is list:
            return [walk(x) for x in v]
        if type(v) is dict:
            return {k: walk(x) for k, x in v.items()}
        return v  # None (an optional value not given), a bool: nothing to mask

    if isinstance(t, Str):
        cut = t.max_len
        return lambda v: rx.sub(repl, v)[:cut] if type(v) is str else v

    def mask(v: Any) -> Any:
        out = walk(v)
        return out if t.check(out) else _fit(out, t)

    return mask


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text) if kind is int else float(text)
    except ValueError:
        return kind(0)


def _fit(value: Any, t: Type) -> Any:
    """``value``, masked, made valid for ``t`` again: strings cut, numbers out of range
    and binary of a length the field refuses made the field's empty value."""
    if t.check(value):
        return value
    if isinstance(t, Str):
        return value[: t.max_len] if type(value) is str else ""
    if isinstance(t, Map) and type(value) is dict:
        return {
            k: v[: t.max_len] if type(v) is str else (v if t._item_ok(k, v) else 0) for k, v in value.items()
        }
    if isinstance(t, IntList) and type(value) is list:
        return [v if type(v) is int and t.lo <= v <= t.hi else t.lo for v in value]
    return _empty(t)


def _empty(t: Type) -> Any:
    if isinstance(t, Bytes):
        return bytes(min(t.lengths))
    if isinstance(t, Int):
        return min(max(0, t.lo), t.hi)
    raise TypeError(f"no empty value of {t!r}")  # the masker refuses other types
