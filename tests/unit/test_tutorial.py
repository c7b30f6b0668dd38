"""docs/tutorial.md quotes real output: every block marked `<!-- checked: CMD -->`
must appear in what CMD prints (runs of lines in order, `...` between runs).
The `uproxy demo` blocks are checked against a running demo in
tests/integration/test_demo.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
BLOCK = re.compile(r"<!-- checked: (?P<command>[^>]+?) -->\n```text\n(?P<body>.*?)```", re.S)


def checked_blocks(command_prefix: str) -> list[tuple[str, list[str]]]:
    """(command, quoted lines) of the tutorial's checked blocks for commands starting so."""
    found = [(m["command"], m["body"].splitlines()) for m in BLOCK.finditer(TUTORIAL.read_text())]
    return [(command, lines) for command, lines in found if command.startswith(command_prefix)]


def missing_from(quoted: list[str], output: list[str]) -> str | None:
    """The first quoted run that `output` does not hold in order, or None."""
    runs: list[list[str]] = [[]]
    for line in quoted:
        if line == "...":
            runs.append([])
        else:
            runs[-1].append(line)
    at = 0
    for run in (r for r in runs if r):
        for start in range(at, len(output) - len(run) + 1):
            if output[start:start + len(run)] == run:
                at = start + len(run)
                break
        else:
            return "\n".join(run)
    return None


def test_the_checker_catches_a_changed_line() -> None:
    output = ["a", "b", "c", "d"]
    assert missing_from(["a", "b", "...", "d"], output) is None
    assert missing_from(["a", "c"], output) == "a\nc"  # not adjacent
    assert missing_from(["c", "...", "a"], output) == "a"  # out of order


BLOCKS = checked_blocks("uproxy explain")


def test_the_tutorial_has_checked_blocks() -> None:
    assert len(BLOCKS) >= 5
    assert checked_blocks("uproxy demo"), "the demo block is checked by test_demo"


@pytest.mark.parametrize(("command", "quoted"), BLOCKS,
                         ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_quoted_output_is_what_the_command_prints(command: str, quoted: list[str]) -> None:
    argv = shlex.split(command)
    assert argv[0] == "uproxy"
    result = subprocess.run([sys.executable, "-m", "uproxy", *argv[1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    missing = missing_from(quoted, result.stdout.splitlines())
    assert missing is None, f"{TUTORIAL.name}: not in the output of {command!r}:\n{missing}"
