"""ktel's layering: the commands are the roof, everything else stands below them.

``ktel/cli.py``, ``ktel/up.py``, ``ktel/replay.py`` and ``ktel/dlq.py`` are the commands; ``ktel.stack`` is
the local development stack that ``ktel up`` and the tests start. Neither is something a
component that runs on a fleet (agent, processing stage, exporter) may depend on, nor the
shared floor (the other ``ktel`` modules), which must also stay free of the components.
Tests and benchmarks may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOF = {"ktel.cli", "ktel.up", "ktel.replay", "ktel.dlq"}
STACK = "ktel.stack"
COMPONENTS = ("edge_agent", "processors", "exporters")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden(module: str, imported: str) -> str | None:
    """Why ``module`` may not import ``imported``; None if it may."""
    if module in ROOF:
        return None
    if imported in ROOF:
        return "a command (the roof)"
    if _within(imported, STACK) and not _within(module, STACK):
        return "the local development stack"
    if _within(module, "ktel") and any(_within(imported, c) for c in COMPONENTS):
        return "a component, from the shared floor"
    return None


def violations(module: str, path: str, source: str, is_package: bool = False) -> list[str]:
    """One line per import in ``source`` that ``module`` may not make, lazy ones included."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # ``from a import b``: b may be a module of a, or a name in it.
            names = [base] if forbidden(module, base) else [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [
            f"{path}:{node.lineno}: {module} imports {name}, {why}"
            for name in names
            if (why := forbidden(module, name))
        ]
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    files = [p for pkg in ("ktel", *COMPONENTS) for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in files}
    assert {"ktel.topics", "edge_agent.probes", "processors.stages", "exporters.otlp"} <= modules.keys()
    found = []
    for name, p in modules.items():
        is_package = p.name == "__init__.py"
        module = name.removesuffix(".__init__")
        found += violations(module, str(p.relative_to(ROOT)), p.read_text(), is_package)
    assert not found, "\n".join(found)


def test_the_check_sees_every_form_of_import() -> None:
    source = """
import ktel.up
from ktel import cli
from ktel.stack.kafka import LocalKafka
from ..stack import proc
import ktel.config, ktel.wire
def lazy():
    from ktel.replay import main
    import edge_agent.probes
"""
    assert [v.split(": ", 1)[1] for v in violations("ktel.x.topics", "t.py", source)] == [
        "ktel.x.topics imports ktel.up, a command (the roof)",
        "ktel.x.topics imports ktel.cli, a command (the roof)",
        "ktel.x.topics imports ktel.stack.kafka, the local development stack",
        "ktel.x.topics imports ktel.stack, the local development stack",
        "ktel.x.topics imports ktel.replay, a command (the roof)",
        "ktel.x.topics imports edge_agent.probes, a component, from the shared floor",
    ]
    # In a package's __init__, "." is the package itself.
    assert violations("ktel", "ktel/__init__.py", "from .stack import proc", is_package=True) == [
        "ktel/__init__.py:1: ktel imports ktel.stack, the local development stack"
    ]
    # The commands may import anything, and the stack its own modules.
    assert violations("ktel.cli", "cli.py", source) == []
    assert violations("ktel.stack.kafka", "kafka.py", "from ktel.stack import proc") == []
    assert violations("edge_agent.agent", "agent.py", "from ktel import runtime") == []
