"""The event loop every uproxy process runs on: uvloop's, installed once per
process by its entry point (the command line, the demo, a worker)."""

from __future__ import annotations


def install_uvloop() -> None:
    import uvloop

    uvloop.install()
