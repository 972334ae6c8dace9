"""Typed shapes for what crosses Kafka: field types with ranges and size bounds,
and event kinds built from them, checked by validators generated from the table.

Every consumer treats every record as untrusted (docs/design.md, principle 11),
so a field's declaration is its whole contract: its type (an ``int`` is never a
``bool``, a number is finite), its range, and a bound on its size. A kind's
validator is generated once, as one Python expression over the event array, so
a valid event costs one pass of inline comparisons (the processors check every
event of every batch); only an event that fails is looked at again, field by
field, to name the field and the reason.

Sizes are in characters for text (what a decoder may produce from a kernel
buffer of N bytes, escapes included, is at most 4N) and in items for maps and
arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import reprlib
from collections.abc import Callable, Sequence
from typing import Any

U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
I32 = (-(1 << 31), (1 << 31) - 1)
U63 = (1 << 63) - 1
U64 = (1 << 64) - 1
I64 = (-(1 << 63), (1 << 63) - 1)


class Type:
    """A field type: ``expr(x)`` is a Python expression true when ``x`` is valid;
    ``names`` are the objects that expression refers to."""

    optional: bool = False

    def expr(self, x: str, names: dict[str, Any]) -> str:
        raise NotImplementedError

    def why(self, value: Any) -> str:
        """Why ``value`` does not fit (called only once it is known not to)."""
        raise NotImplementedError

    @functools.cached_property
    def check(self) -> Callable[[Any], bool]:
        """The type's validator as a function (compiled once per type)."""
        names: dict[str, Any] = {}
        return eval(f"lambda x: {self.expr('x', names)}", names)  # noqa: S307 (our own text)


def _bind(names: dict[str, Any], value: Any) -> str:
    name = f"_v{len(names)}"
    names[name] = value
    return name


_fresh = itertools.count()


def _local() -> str:
    """A name for a generated loop variable, unlike any other in the expression (a map of
    maps nests one loop in another)."""
    return f"_i{next(_fresh)}"


def _opt(t: Type, body: str, x: str) -> str:
    return f"({x} is None or {body})" if t.optional else body


@dataclasses.dataclass(frozen=True)
class Int(Type):
    lo: int = 0
    hi: int = U63
    optional: bool = False

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return _opt(self, f"(type({x}) is int and {self.lo} <= {x} <= {self.hi})", x)

    def why(self, value: Any) -> str:
        if type(value) is not int:
            return f"must be an integer{' or nil' if self.optional else ''}, got {show(value)}"
        return f"must be within [{self.lo}, {self.hi}], got {value}"


@dataclasses.dataclass(frozen=True)
class Float(Type):
    """A finite number (an int is accepted: msgpack keeps 2.0 and 2 apart, writers may not)."""

    lo: float = -math.inf
    hi: float = math.inf
    optional: bool = False

    def expr(self, x: str, names: dict[str, Any]) -> str:
        isfinite = _bind(names, math.isfinite)
        # A bool is an int to Python: refuse it explicitly.
        body = (
            f"(type({x}) in (int, float) and {isfinite}({x}) "
            f"and {_bind(names, self.lo)} <= {x} <= {_bind(names, self.hi)})"
        )
        return _opt(self, body, x)

    def why(self, value: Any) -> str:
        if type(value) not in (int, float):
            return f"must be a number, got {show(value)}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        return f"must be within [{self.lo}, {self.hi}], got {value}"


@dataclasses.dataclass(frozen=True)
class Bool(Type):
    def expr(self, x: str, names: dict[str, Any]) -> str:
        return f"(type({x}) is bool)"

    def why(self, value: Any) -> str:
        return f"must be true or false, got {show(value)}"


@dataclasses.dataclass(frozen=True)
class Str(Type):
    max_len: int = 256
    choices: frozenset[str] | None = None
    optional: bool = False

    def expr(self, x: str, names: dict[str, Any]) -> str:
        if self.choices is not None:
            return _opt(self, f"(type({x}) is str and {x} in {_bind(names, self.choices)})", x)
        return _opt(self, f"(type({x}) is str and len({x}) <= {self.max_len})", x)

    def why(self, value: Any) -> str:
        if type(value) is not str:
            return f"must be a string, got {show(value)}"
        if self.choices is not None:
            return f"must be one of {', '.join(sorted(self.choices))}, got {show(value)}"
        return f"must be at most {self.max_len} characters, got {len(value)}"


@dataclasses.dataclass(frozen=True)
class Bytes(Type):
    lengths: tuple[int, ...] = ()

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return f"(type({x}) is bytes and len({x}) in {self.lengths!r})"

    def why(self, value: Any) -> str:
        if type(value) is not bytes:
            return f"must be binary, got {show(value)}"
        return f"must be {' or '.join(map(str, self.lengths))} bytes long, got {len(value)}"


@dataclasses.dataclass(frozen=True)
class Blob(Type):
    """Binary of any length up to ``max_len`` (e.g. a dead letter's original bytes)."""

    max_len: int

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return f"(type({x}) is bytes and len({x}) <= {self.max_len})"

    def why(self, value: Any) -> str:
        if type(value) is not bytes:
            return f"must be binary, got {show(value)}"
        return f"must be at most {self.max_len} bytes long, got {len(value)}"


@dataclasses.dataclass(frozen=True)
class Map(Type):
    """A map of short string keys to string (and, with ``ints``, integer) values."""

    max_items: int = 16
    max_len: int = 256
    ints: bool = False

    def _item_ok(self, k: Any, v: Any) -> bool:
        if type(k) is not str or len(k) > self.max_len:
            return False
        if type(v) is str:
            return len(v) <= self.max_len
        return self.ints and type(v) is int and I64[0] <= v <= U64

    def expr(self, x: str, names: dict[str, Any]) -> str:
        ok = _bind(names, self._item_ok)
        return (
            f"(type({x}) is dict and len({x}) <= {self.max_items} "
            f"and all({ok}(k, v) for k, v in {x}.items()))"
        )

    def why(self, value: Any) -> str:
        if type(value) is not dict:
            return f"must be a map, got {show(value)}"
        if len(value) > self.max_items:
            return f"must have at most {self.max_items} entries, got {len(value)}"
        what = "strings or integers" if self.ints else "strings"
        return f"must map strings to {what} of at most {self.max_len} characters"


@dataclasses.dataclass(frozen=True)
class IntList(Type):
    length: int
    lo: int = 0
    hi: int = U64

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return (
            f"(type({x}) is list and len({x}) == {self.length} "
            f"and all(type(b) is int and {self.lo} <= b <= {self.hi} for b in {x}))"
        )

    def why(self, value: Any) -> str:
        if type(value) is not list or len(value) != self.length:
            return f"must be an array of {self.length} integers, got {show(value)}"
        return f"must hold integers within [{self.lo}, {self.hi}]"


@dataclasses.dataclass(frozen=True)
class OneOf(Type):
    types: tuple[Type, ...]
    label: str  # what a value must be, in words

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return "(" + " or ".join(t.expr(x, names) for t in self.types) + ")"

    def why(self, value: Any) -> str:
        return f"must be {self.label}, got {show(value)}"


@dataclasses.dataclass(frozen=True)
class Array(Type):
    """An array of at most ``max_items``, whose items its reader checks itself."""

    max_items: int

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return f"(type({x}) is list and len({x}) <= {self.max_items})"

    def why(self, value: Any) -> str:
        if type(value) is not list:
            return f"must be an array, got {show(value)}"
        return f"must have at most {self.max_items} items, got {len(value)}"


@dataclasses.dataclass(frozen=True)
class ListOf(Type):
    item: Type
    max_items: int

    def expr(self, x: str, names: dict[str, Any]) -> str:
        i = _local()
        return (
            f"(type({x}) is list and len({x}) <= {self.max_items} "
            f"and all({self.item.expr(i, names)} for {i} in {x}))"
        )

    def why(self, value: Any) -> str:
        if type(value) is not list:
            return f"must be an array, got {show(value)}"
        if len(value) > self.max_items:
            return f"must have at most {self.max_items} items, got {len(value)}"
        i = next(i for i, v in enumerate(value) if not self.item.check(v))
        return f"item {i} {self.item.why(value[i])}"


@dataclasses.dataclass(frozen=True)
class MapOf(Type):
    """A map of string keys (at most ``key_len`` characters) to values of one type."""

    value: Type
    max_items: int
    key_len: int = 256

    def _ok(self, k: Any, v: Any) -> bool:
        return type(k) is str and len(k) <= self.key_len and self.value.check(v)

    def expr(self, x: str, names: dict[str, Any]) -> str:
        # Inline, not a call of _ok per entry: half of what decoding a heartbeat cost.
        k, v = _local(), _local()
        return (
            f"(type({x}) is dict and len({x}) <= {self.max_items} "
            f"and all(type({k}) is str and len({k}) <= {self.key_len} and {self.value.expr(v, names)} "
            f"for {k}, {v} in {x}.items()))"
        )

    def why(self, value: Any) -> str:
        if type(value) is not dict:
            return f"must be a map, got {show(value)}"
        if len(value) > self.max_items:
            return f"must have at most {self.max_items} entries, got {len(value)}"
        k, v = next((k, v) for k, v in value.items() if not self._ok(k, v))
        if type(k) is not str or len(k) > self.key_len:
            return f"has a key that is not a string of at most {self.key_len} characters: {show(k)}"
        return f"entry {k[:40]!r} {self.value.why(v)}"


@dataclasses.dataclass(frozen=True)
class Row(Type):
    """An array whose items have types by position."""

    fields: tuple[Field, ...]

    def expr(self, x: str, names: dict[str, Any]) -> str:
        return f"{_bind(names, compile_fields(self.fields, 0))}({x})"

    def why(self, value: Any) -> str:
        return explain(self.fields, 0, value)


@dataclasses.dataclass(frozen=True)
class Key:
    """One entry of a record (a msgpack map): its key, its type, whether it must be there."""

    name: str
    type: Type
    required: bool = True
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Shape(Type):
    """A map with named entries. Keys it does not name are allowed: a newer writer
    may add one, and an older reader ignores it."""

    keys: tuple[Key, ...]

    def expr(self, x: str, names: dict[str, Any]) -> str:
        parts = [f"type({x}) is dict"]
        for k in self.keys:
            name = repr(k.name)
            valid = k.type.expr(f"{x}[{name}]", names)
            parts.append(f"({name} in {x} and {valid})" if k.required else f"({name} not in {x} or {valid})")
        return "(" + " and ".join(parts) + ")"

    def problem(self, obj: dict[str, Any]) -> str | None:
        """Why ``obj`` does not fit, or None."""
        if self.check(obj):
            return None  # (one compiled pass; only a record that fails is looked at again)
        for k in self.keys:
            if k.name not in obj:
                if k.required:
                    return f"field {k.name!r} is missing"
            elif not k.type.check(obj[k.name]):
                return f"field {k.name!r} {k.type.why(obj[k.name])}"
        return None

    def why(self, value: Any) -> str:
        if type(value) is not dict:
            return f"must be a map, got {show(value)}"
        return self.problem(value) or "is valid"


# What an error message shows of a bad value: a few levels and characters of it.
# reprlib never descends past maxlevel, so a value nested thousands deep (msgpack
# unpacks that) costs no recursion.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 40, 40, 4, 4


def brief(value: Any) -> str:
    """A bad value, short, for an error message, whatever its nesting or size."""
    text = _REPR.repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''}"


def show(value: Any) -> str:
    """``brief``, with the value's type."""
    return f"{type(value).__name__} {brief(value)}"


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: Type
    doc: str = ""


def compile_fields(fields: Sequence[Field], offset: int, head: str = "") -> Callable[[Any], bool]:
    """A function true when ``row[offset + i]`` fits ``fields[i]`` for every i and
    ``row`` is a list of exactly ``offset + len(fields)`` items (and ``head``, an
    expression over ``r``, holds).

    Generated as one function that unpacks the row into locals first: a local is
    cheaper to read than an item, and each field is read two or three times."""
    names: dict[str, Any] = {}
    n = offset + len(fields)
    items = [f"_{i}" for i in range(n)]
    terms = [f.type.expr(items[offset + i], names) for i, f in enumerate(fields)]
    src = (
        "def valid(r):\n"
        f"    if type(r) is not list or len(r) != {n}{f' or not ({head})' if head else ''}:\n"
        "        return False\n"
        f"    {', '.join(items)}{',' if n == 1 else ''} = r\n"
        f"    return {' and '.join(terms) or 'True'}\n"
    )
    exec(src, names)  # noqa: S102 (generated from the declarations above, not from input)
    return names["valid"]


def explain(fields: Sequence[Field], offset: int, row: Any) -> str:
    """Why ``row`` fails ``compile_fields(fields, offset)``."""
    if type(row) is not list:
        return f"is not an array ({show(row)})"
    if len(row) != offset + len(fields):
        return f"has {len(row) - offset} fields, expected {len(fields)}"
    for i, f in enumerate(fields):
        if not f.type.check(row[offset + i]):
            return f"field {f.name!r} {f.type.why(row[offset + i])}"
    return "is valid"  # not reached by callers: they ask only after a failed check


@dataclasses.dataclass(frozen=True)
class Metric:
    """How the aggregate stage counts a kind's events: one counter, ``name``, with a
    label per (label, field) pair whose value is the event's field as text."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class EventKind:
    """One kind of event. Its wire form is an array: the kind id, then ``fields`` in order.

    ``id`` is an ABI: never reused or renumbered. ``keep``: the sample stage always
    keeps it (rare or an error). ``metric``: the counter the aggregate stage keeps of
    it, if any.
    """

    id: int
    name: str
    fields: tuple[Field, ...]
    keep: bool = False
    metric: Metric | None = None
    valid: Callable[[Any], bool] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # r[0] is the kind id, an int (a bool would hash like 1 and find kind 1).
        object.__setattr__(self, "valid", compile_fields(self.fields, 1, "type(r[0]) is int"))

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def index(self, field: str) -> int:
        """Where ``field`` sits in the event array (the kind id is at 0)."""
        return self.field_names.index(field) + 1

    def why(self, event: Any) -> str:
        return explain(self.fields, 1, event)


# Field types shared by the probes and the records.
TS_NS = Int(0, U63)  # wall clock, ns since the epoch
PID = Int(0, U32)
COMM = Str(64)  # the kernel's 16-byte comm, escapes included
# An OpenTelemetry attribute value: a string, number or boolean, or an array of them.
ATTR_CHARS = 4096  # the longest string one may be
_PRIMITIVE = OneOf((Str(ATTR_CHARS), Int(I64[0], U64), Float(), Bool()), "a string, number or boolean")
ATTR_VALUE = OneOf(
    (_PRIMITIVE, ListOf(_PRIMITIVE, 128)), "a string, number or boolean, or an array of them (128 at most)"
)
