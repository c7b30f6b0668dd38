"""Running the rule tools (iptables-restore, nft) as subprocesses."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from uproxy.rules.base import RulesError

COMMAND_TIMEOUT = 60.0  # seconds; a 10k-service restore takes well under one


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run(argv: Sequence[str], stdin: str | None = None,
              timeout: float = COMMAND_TIMEOUT) -> Result:
    """Run argv; a missing program or a timeout is a RulesError."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as error:
        raise RulesError(f"{argv[0]}: command not found") from error
    try:
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except TimeoutError as error:
        process.kill()
        await process.wait()
        raise RulesError(f"{' '.join(argv)}: no answer within {timeout:g}s") from error
    assert process.returncode is not None
    return Result(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def first_line(text: str) -> str:
    """A tool's complaint in one line: its first non-empty line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "failed")


_LINE = re.compile(r"line:? (\d+)")


def failing_line(stderr: str, stdin: str) -> str:
    """The tool's complaint, with the input line it names (iptables-restore, nft -f)."""
    message = " ".join(stderr.strip().splitlines()[-3:]) or "failed"
    found = _LINE.search(stderr)
    if found is None:
        found = re.search(r":(\d+):\d+", stderr)  # nft: /dev/stdin:LINE:COL-COL: Error
    if found is not None:
        number = int(found.group(1))
        lines = stdin.splitlines()
        if 0 < number <= len(lines):
            return f"{message} [line {number}: {lines[number - 1].strip()}]"
    return message
