"""Idle established connections for S5.

    holdconns.py server HOST PORT          accept, answer one byte, hold
    holdconns.py client HOST PORT N        open N connections, one round trip each, hold

The client prints `READY <n>` once n connections (n <= N: it stops at the first
failures it cannot retry past, e.g. the proxy's file-descriptor limit) have
each completed a one-byte round trip through the proxy, then holds them until
it is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import resource


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def server(host: str, port: int) -> None:
    held: list[asyncio.StreamWriter] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        try:
            if await reader.read(1):
                writer.write(b"y")
        except OSError:
            pass

    srv = await asyncio.start_server(on_client, host, port, backlog=4096)
    async with srv:
        await srv.serve_forever()


async def client(host: str, port: int, count: int, concurrency: int = 200) -> None:
    held: list[asyncio.StreamWriter] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal failures
        async with gate:
            if failures > 50:
                return
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                writer.write(b"x")
                if await asyncio.wait_for(reader.read(1), 5) != b"y":
                    raise ConnectionError("no reply")
            except (OSError, TimeoutError, ConnectionError):
                failures += 1
                return
            held.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    print(f"READY {len(held)} failures={failures}", flush=True)
    await asyncio.Event().wait()  # hold until the harness stops this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int, nargs="?", default=0)
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if args.mode == "server":
        asyncio.run(server(args.host, args.port))
    else:
        asyncio.run(client(args.host, args.port, args.count))


if __name__ == "__main__":
    main()
