"""The docs list what the ``ktel`` command takes, and only that: every command (each
stage and exporter too) is in the README's list ("Running the pieces on a fleet"), each
line of which is a command `ktel` has, and every option of a command is named in the
README or docs/, so that a command or option added is documented with it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ktel import cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_LIST = re.compile(r"^## Running the pieces on a fleet$.*?^```sh\n(.*?)^```", re.S | re.M)
# The options every command takes, which the README gives once after the list.
COMMON = {"--config", "--log-level", "-h", "--help"}


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """``ktel``'s parser, and each command's."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


def listed() -> list[list[str]]:
    """The README list's lines, each as its words up to the comment."""
    block = COMMAND_LIST.search(README.read_text())
    assert block, "the README has no command list under 'Running the pieces on a fleet'"
    lines = [line.partition("#")[0].split() for line in block.group(1).splitlines() if line.strip()]
    assert all(line[0] == "ktel" for line in lines)
    return lines


def choices(parser: argparse.ArgumentParser) -> list[str] | None:
    """What a command takes one of as its first argument (a stage, an exporter), or None."""
    taken = [a.choices for a in parser._actions if a.choices and not a.option_strings]
    return [str(c) for c in taken[0]] if taken else None


def test_every_command_is_in_the_readmes_list():
    lines = listed()
    missing = []
    for name, parser in parsers()[1].items():
        # A command that takes one of some choices (a stage, an exporter): a line each.
        some = choices(parser)
        wanted = [[name, c] for c in some] if some is not None else [[name]]
        missing += [" ".join(w) for w in wanted if not any(line[1 : 1 + len(w)] == w for line in lines)]
    assert not missing, f"commands the README's list lacks: {missing}"


def test_every_command_the_readme_lists_exists():
    known = parsers()[1]

    def exists(line: list[str]) -> bool:
        if line[1].startswith("-"):
            return True  # (`ktel --version` names no command)
        if line[1] not in known:
            return False
        # A stage or exporter it names must be one the command takes.
        some = choices(known[line[1]])
        return some is None or (len(line) > 2 and line[2] in some)

    unknown = [" ".join(line) for line in listed() if not exists(line)]
    assert not unknown, f"the README lists commands ktel does not have: {unknown}"


def test_every_option_is_described_in_the_docs():
    text = "\n".join(path.read_text() for path in DOCS)
    parser, commands = parsers()
    missing = []
    for where, command in [("ktel", parser), *((f"ktel {name}", c) for name, c in commands.items())]:
        for action in command._actions:
            names = set(action.option_strings)
            # (one of an option's names will do: `-v` is `--verbose`)
            if (
                names
                and not names & COMMON
                and not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text) for n in names)
            ):
                missing.append(f"{where} {max(names, key=len)}")
    assert not missing, f"options neither the README nor docs/ name: {missing}"
