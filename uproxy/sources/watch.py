"""Noticing that the services file may have changed: inotify, else a poll.

inotify (through asyncinotify) watches the folder that holds the file (or the
folder given), so an edit in place, an atomic rename over the file and a
Kubernetes ConfigMap update (a `..data` symlink swapped in the folder) all
wake the source at once. Only events that end a write are asked for
(close-after-write, renames, deletions, attribute changes), so a file
written in many pieces wakes it once, when it is closed. A burst of
events (a folder rewritten file by file) is one wake after SETTLE seconds of
quiet; a single services file closed after a write or renamed into place
wakes it at once. The caller still compares the file's fingerprint, so an
event for an unrelated file in the same folder costs one stat() and nothing
else.

Where inotify cannot be used (no inotify, the per-user watch limit reached,
the folder gone), `wait` returns after the poll interval, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncinotify import Inotify

log = logging.getLogger(__name__)

SETTLE = 0.02  # seconds without events that end a burst
SETTLE_MAX = 0.5  # a burst longer than this wakes anyway


class Watch:
    """`wait()` returns True when something in the watched folder changed."""

    def __init__(self, path: Path, poll_interval: float) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._inotify: Inotify | None = None
        self.inotify_failure: str | None = None  # why inotify is not used, once known
        # A single file (not a folder) is whole once it is closed after a write
        # or renamed into place: no burst to wait out.
        self._file: str | None = None

    @property
    def active(self) -> bool:
        return self._inotify is not None

    def start(self) -> None:
        """Set the watch up; says once why it cannot and then polls."""
        try:
            from asyncinotify import Inotify, Mask

            inotify = Inotify()
            is_folder = self.path.is_dir()
            folder = self.path if is_folder else self.path.parent
            # Not CREATE (nor MODIFY): a file being written wakes us when it is
            # closed (CLOSE_WRITE), not while it is half there.
            mask = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE
                    | Mask.ATTRIB | Mask.DELETE_SELF | Mask.MOVE_SELF)
            try:
                inotify.add_watch(folder, mask)
            except Exception:
                inotify.close()
                raise
        except Exception as error:  # ImportError, OSError (ENOSPC: the watch limit)
            self.inotify_failure = str(error) or type(error).__name__
            log.info("services file %s: no inotify (%s); checking every %g s", self.path,
                     self.inotify_failure, self.poll_interval)
            return
        self._inotify = inotify
        self._file = None if is_folder else self.path.name

    async def wait(self, timeout: float) -> bool:
        """True after a burst of events; False when `timeout` (or, polling, the poll
        interval) passed without one."""
        inotify = self._inotify
        if inotify is None:
            await asyncio.sleep(min(timeout, self.poll_interval))
            return False
        from asyncinotify import Mask

        try:
            event = await asyncio.wait_for(inotify.get(), timeout)
        except TimeoutError:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_MAX
        whole = Mask.CLOSE_WRITE | Mask.MOVED_TO
        while True:
            if event.mask & (Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF):
                self._stop("the watched folder went away")
                return True
            if self._file is not None and event.mask & whole and event.name is not None \
                    and event.name.name == self._file:
                return True  # the services file itself was written whole
            remaining = deadline - loop.time()
            if remaining <= 0:
                return True
            try:
                event = await asyncio.wait_for(inotify.get(), min(SETTLE, remaining))
            except TimeoutError:
                return True

    def _stop(self, why: str) -> None:
        log.info("services file %s: %s; checking every %g s", self.path, why,
                 self.poll_interval)
        self.inotify_failure = why
        self.close()

    def close(self) -> None:
        inotify, self._inotify = self._inotify, None
        if inotify is not None:
            with contextlib.suppress(Exception):
                inotify.close()
