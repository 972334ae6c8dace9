"""Golden in/out files of the stages' pure cores: tests/golden/<stage>/<case>.{in,out}.json.

``KTEL_UPDATE_GOLDEN=1`` rewrites the outputs from what the core makes now;
review the diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent / "golden"


def cases(stage: str) -> list[str]:
    return sorted(p.name.removesuffix(".in.json") for p in (ROOT / stage).glob("*.in.json"))


def load(stage: str, name: str) -> Any:
    return json.loads((ROOT / stage / f"{name}.in.json").read_text())


def check(stage: str, name: str, got: Any) -> None:
    out = ROOT / stage / f"{name}.out.json"
    # Through JSON, so tuples and lists compare as the file holds them.
    got = json.loads(json.dumps(got))
    if os.environ.get("KTEL_UPDATE_GOLDEN"):
        out.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(out.read_text())
