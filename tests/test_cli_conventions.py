"""The command line reads as one tool (docs/engine.md, "The command line"): `--version`, the shared
option names, errors in flags, YAML key suggestions, and help that renders whole at 80 columns."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import safemerge
from safemerge.cli import app

runner = CliRunner()
WIDTH = 80
# words that mark an option's default in its help: "Default X." or that it has none
DEFAULT_MARKS = ("Default", "Required", "Optional", "No default")


def commands() -> Iterator[tuple[list[str], Any]]:
    """(argv prefix, click command) for every command and sub-command of the app."""
    root = typer.main.get_command(app)

    def walk(prefix: list[str], cmd: Any) -> Iterator[tuple[list[str], Any]]:
        yield prefix, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk([*prefix, name], sub)

    yield from walk([], root)


COMMANDS = [(" ".join(p) or "safemerge", p, c) for p, c in commands()]


def invoke(args: list[str], columns: int = 400) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": str(columns), "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def words(text: str) -> str:
    """Text with wrapped lines joined (a line broken after a hyphen joins without a space) and
    whitespace collapsed; box-drawing borders, should the help be drawn in panels, removed."""
    text = re.sub(r"(?<=\w-)\n\s*", "", text)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def visible_options(cmd: Any) -> list[Any]:
    """The options and arguments `--help` shows (not --help itself)."""
    return [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]


def test_version() -> None:
    code, out = invoke(["--version"])
    assert code == 0 and out.strip() == f"safemerge {safemerge.__version__}"


@pytest.mark.parametrize(("name", "argv", "cmd"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_renders_whole_at_80_columns(name: str, argv: list[str], cmd: Any) -> None:
    """At 80 columns every option's help and every paragraph of the command's description appears
    whole (its words in order once wrapped lines are joined: nothing folded mid-word or dropped), and the
    description has no line break that a docstring's source layout put there."""
    code, out = invoke([*argv, "--help"], columns=WIDTH)
    assert code == 0, out
    assert max(len(line) for line in out.splitlines()) <= WIDTH
    flat = words(out)
    for p in visible_options(cmd):
        assert words(p.help or "") in flat, (name, p.opts, p.help)
    for paragraph in (cmd.help or "").split("\n\n"):
        assert "\n" not in paragraph, (name, "hard line break in the help source", paragraph)
        assert words(paragraph) in flat, (name, paragraph)
    assert_no_early_breaks(name, out)


def assert_no_early_breaks(name: str, out: str) -> None:
    """In the description (after the usage line, before the first section such as "Options:"), a line
    followed by more text of its paragraph is full: the next word would not have fitted after it
    (click wraps help to 78 columns of an 80-column terminal)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    section = re.compile(r"^(\w[\w ]*:$|\s*╭)")
    end = next((i for i in range(start, len(lines)) if section.match(lines[i])), len(lines))
    block = [line.rstrip() for line in lines[start:end]]
    for line, nxt in itertools.pairwise(block):
        if line.strip() and nxt.strip():
            assert len(line) + 1 + len(nxt.split()[0]) > WIDTH - 2, (name, "line broken early", line, nxt)


@pytest.mark.parametrize(("name", "argv", "cmd"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_option_states_its_default_one_way(name: str, argv: list[str], cmd: Any) -> None:
    """One defaults style: each option's help says "Default X." (or Required./Optional./No default.);
    typer's own "[default: …]" is not shown next to it."""
    unmarked = [
        p.opts[0]
        for p in visible_options(cmd)
        if p.name != "version" and not any(mark in (p.help or "") for mark in DEFAULT_MARKS)
    ]
    assert not unmarked, (name, "no Default/Required/Optional in the help of", unmarked)
    typer_shown = [
        p.opts[0] for p in visible_options(cmd) if p.show_default and p.default not in (None, False)
    ]
    assert not typer_shown, (name, "typer's [default: …] shown for", typer_shown)
