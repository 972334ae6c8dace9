"""The docs describe every setting: each field of ktel's config (ktel/config.py) is named
in the README or docs/ as `section.field`, or under its `[section]` in a TOML example
there, so that a user reading them finds each setting `ktel config` prints, and a field
added to the config is documented with it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from ktel.config import Config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)
TOML_TABLE = re.compile(r"^\[\[?([\w.]+)\]\]?")
# A key set, or one commented out as an example of what may be set.
TOML_KEY = re.compile(r"^(?:#\s*)?(\w+)\s*=")


def settings(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[str]:
    """Every field of the config, dotted as the docs name it (a section within a
    section, as kafka.principals, by each of its fields)."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from settings(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def in_toml_examples(text: str) -> set[str]:
    """The settings a TOML example of ``text`` gives, dotted under their table."""
    named = set()
    for block in TOML_BLOCK.findall(text):
        table = None
        for line in block.splitlines():
            if header := TOML_TABLE.match(line):
                table = header.group(1)
            elif table and (key := TOML_KEY.match(line.strip())):
                named.add(f"{table}.{key.group(1)}")
    return named


def documented(name: str, texts: list[str], examples: set[str]) -> bool:
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w])")
    return name in examples or any(pattern.search(text) for text in texts)


def test_the_settings_are_found():
    names = set(settings())
    # (a section's field, a field of a section within one, and each kind of example)
    assert {"kafka.bootstrap", "kafka.principals.dlq", "service.log_format"} <= names
    examples = set().union(*(in_toml_examples(path.read_text()) for path in DOCS))
    assert {"kafka.principals.agent", "remote_write.tls_check_hostname"} <= examples


def test_every_setting_is_described_in_the_docs():
    texts = [path.read_text() for path in DOCS]
    examples = set().union(*(in_toml_examples(text) for text in texts))
    missing = [name for name in settings() if not documented(name, texts, examples)]
    assert not missing, f"settings neither the README nor docs/ name: {missing}"
