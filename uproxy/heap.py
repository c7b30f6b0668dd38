"""The cyclic garbage collector, paused around bulk work.

A reload of a 10k-service file or a sync that opens 10k listeners makes
hundreds of thousands of objects, none of them in a reference cycle. While
they are made the collector runs again and again and walks the growing heap:
measured at 10k services, it was half of re-reading the file (232 ms with it,
117 ms without) and a third of a sync that adds every service (planning 293
-> 182 ms, opening listeners 743 -> 398 ms). Reference counts still free
whatever such work drops; the collector catches up once it is enabled again.

Pauses nest and may overlap between threads (a reload in a worker thread, a
sync on the loop): the collector is enabled again when the last one ends,
and left alone if something else had disabled it.

What bulk work made mostly lives on (the services, slices, listeners and
table rows of the new state). Enabled again over it, the collector's next
young collection walks all of it at once, on the loop: 60-90 ms after a
10k-service reload or sync, paid before the new listeners serve. So a pause
that ends with more than FREEZE_AFTER new container objects moves them to
the permanent generation (gc.freeze), as the app does once with its first
state. Reference counts still free them when they go; what is lost is only
the collection of reference cycles that were garbage at that moment, and
model objects make none.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

FREEZE_AFTER = 50_000  # container objects made (net) while paused

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                if gc.get_count()[0] >= FREEZE_AFTER:
                    gc.freeze()
                gc.enable()
