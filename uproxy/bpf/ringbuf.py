"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) from Python: the
consumer position page mapped read-write, the producer page and the data
mapped read-only and twice in a row (as the kernel lays it out, so a record
never wraps). Each record: a u32 length (bit 31: still being written, bit 30:
discarded), a u32 page offset, the data, padded to 8 bytes.
"""

from __future__ import annotations

import mmap
import os
import struct

from uproxy.bpf.syscall import map_create

MAP_TYPE_RINGBUF = 27
_BUSY, _DISCARD = 1 << 31, 1 << 30
_HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    def __init__(self, size: int = 64 * 1024, name: str = "") -> None:
        self.size = size  # a power of two, a multiple of the page size
        self.fd = map_create(MAP_TYPE_RINGBUF, 0, 0, size, name)
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(self.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._page = page

    def read(self) -> list[bytes]:
        """Every complete record since the last read, oldest first."""
        records = []
        consumer = _U64.unpack_from(self._consumer, 0)[0]
        producer = _U64.unpack_from(self._producer, 0)[0]
        while consumer < producer:
            at = self._page + (consumer & (self.size - 1))
            length = _U32.unpack_from(self._producer, at)[0]
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                records.append(bytes(self._producer[at + _HEADER:at + _HEADER + size]))
            consumer += (_HEADER + size + 7) & ~7
            _U64.pack_into(self._consumer, 0, consumer)
        return records

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        os.close(self.fd)
