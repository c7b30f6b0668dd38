"""Batched UDP receive: recvmmsg(2) through ctypes.

Python's socket module has no binding, and PyPI has no maintained
one (pysockmmsg 0.0.2, 2021, is the only one), so this module calls libc
itself. Everything the kernel reads or writes lives in buffers allocated once
(`mmsghdr` and `iovec` arrays, source addresses, ancillary data, payload
arenas); Python reads and writes them with `struct`, so a batch costs one
foreign call and no ctypes object per datagram.

`Receiver` fills up to `slots` datagrams per call, each with its source
address and, when asked, the local address it was sent to (IP_PKTINFO /
IPV6_PKTINFO) and the segment size of datagrams the kernel coalesced
(UDP_GRO). Linux, LP64 only (checked at import).

sendmmsg was bound here too and dropped: queuing a UDP relay's replies for
one sendmmsg per loop iteration saved syscalls but cost more Python per
datagram than it saved (measured; see relay/udp.py).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import sys

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python 3.11 has no constant
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SOL_UDP = 17
UDP_SEGMENT = 103  # send: one buffer, cut into datagrams of this size (GSO)
UDP_GRO = 104  # receive: datagrams of one flow may arrive as one buffer, with their size
MAX_DATAGRAM = 65536  # more than any UDP payload (65,507 over IPv4, 65,527 over IPv6)
NAME_SIZE = 28  # sizeof(struct sockaddr_in6), the largest address a UDP socket reports
# one in_pktinfo (12) or in6_pktinfo (20), and a UDP_GRO segment size (int)
CONTROL_SIZE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)
MSG_DONTWAIT = 0x40
_RETRY = (errno.EAGAIN, errno.EINTR)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


# name, namelen, iov, iovlen, control, controllen, flags, len: the LP64 layout,
# checked against the C one below so a struct call can read and write it.
HEADER = struct.Struct("=QI4xQQQQi4xI4x")
IOVEC = struct.Struct("=QQ")
_CMSG = struct.Struct("=Qii")  # cmsg_len, cmsg_level, cmsg_type; the data follows


def _check_layout() -> None:
    offsets = [getattr(_Msghdr, field[0]).offset for field in _Msghdr._fields_]
    if (ctypes.sizeof(_Mmsghdr), ctypes.sizeof(_Iovec), offsets, _Mmsghdr.msg_len.offset) != (
            HEADER.size, IOVEC.size, [0, 8, 16, 24, 32, 40, 48], 56):
        raise ImportError("uproxy.relay.mmsg: struct mmsghdr is not laid out as on LP64 Linux")
    if socket.CMSG_LEN(0) != _CMSG.size:
        raise ImportError("uproxy.relay.mmsg: struct cmsghdr is not laid out as on LP64 Linux")


_check_layout()
# PyDLL keeps the GIL across the call: the sockets are nonblocking (and the
# flags say so), so the call never waits, and releasing the GIL costs more.
_libc = ctypes.PyDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


def address_of(buffer: bytearray | mmap.mmap) -> int:
    """The address of a writable buffer's first byte (it never moves: bytearrays
    here are never resized, and an mmap is fixed)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _error() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


class Receiver:
    """Up to `slots` datagrams per `receive`, each in its own 64 KiB slot.

    The payload arena is an anonymous mapping: only the pages datagrams touch
    become resident. After a `receive`, `messages` describes what it read until
    the next `receive`.
    """

    __slots__ = ("_filled", "_headers", "_headers_at", "_iovecs", "_map", "_pristine", "arena",
                 "control", "names", "slots")

    def __init__(self, slots: int, *, control: bool) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * MAX_DATAGRAM)
        self.arena = memoryview(self._map)
        self.names = bytearray(slots * NAME_SIZE)
        self.control = bytearray(slots * CONTROL_SIZE if control else 0)
        iovecs = bytearray(slots * IOVEC.size)
        self._headers = bytearray(slots * HEADER.size)
        arena_at = address_of(self._map)
        names_at, iovecs_at = address_of(self.names), address_of(iovecs)
        control_at = address_of(self.control) if control else 0
        control_size = CONTROL_SIZE if control else 0
        for i in range(slots):
            IOVEC.pack_into(iovecs, i * IOVEC.size, arena_at + i * MAX_DATAGRAM, MAX_DATAGRAM)
            HEADER.pack_into(self._headers, i * HEADER.size,
                             names_at + i * NAME_SIZE, NAME_SIZE, iovecs_at + i * IOVEC.size, 1,
                             control_at + i * control_size, control_size, 0, 0)
        self._iovecs = iovecs  # the headers point into it
        self._pristine = bytes(self._headers)
        self._headers_at = address_of(self._headers)
        self._filled = 0  # headers the last receive wrote into (lengths, flags)

    def receive(self, fd: int) -> int:
        """Datagrams read (0: none waiting). Raises OSError on other errors."""
        filled = self._filled * HEADER.size
        self._headers[:filled] = self._pristine[:filled]  # the kernel shrank namelen/controllen
        count: int = _recvmmsg(fd, self._headers_at, self.slots, MSG_DONTWAIT, None)
        self._filled = max(count, 0)
        if count < 0:
            error = _error()
            if error.errno in _RETRY:
                return 0
            raise error
        return count

    def messages(self, count: int) -> list[tuple[memoryview, bytes, bytes, int]]:
        """The `count` messages of the last `receive`, each as: its payload (a
        view into the arena, valid until the next receive), its source address
        (a raw sockaddr), the local address it was sent to (4 or 16 raw bytes;
        empty if unknown), and, when the kernel coalesced several datagrams of
        one flow (UDP_GRO), their size (the payload is then those datagrams
        back to back, the last one possibly shorter; 0 for one datagram)."""
        names = bytes(self.names[:count * NAME_SIZE])  # one copy; its slices are bytes
        arena, control = self.arena, self.control
        found = []
        start = at = cmsg_at = 0
        for _, namelen, _, _, _, controllen, _, length in HEADER.iter_unpack(
                memoryview(self._headers)[:count * HEADER.size]):
            local, segment = _ancillary(control, cmsg_at, controllen) if controllen else _NONE
            found.append((arena[start:start + length], names[at:at + namelen], local, segment))
            start += MAX_DATAGRAM
            at += NAME_SIZE
            cmsg_at += CONTROL_SIZE
        return found


_NONE = (b"", 0)


def _ancillary(control: bytearray, at: int, size: int) -> tuple[bytes, int]:
    """The destination address in IP_PKTINFO / IPV6_PKTINFO ancillary data,
    and the segment size in UDP_GRO's."""
    end = at + size
    local, segment = b"", 0
    while at + _CMSG.size <= end:
        length, level, kind = _CMSG.unpack_from(control, at)
        if length < _CMSG.size:
            break
        data = at + _CMSG.size
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and length >= _CMSG.size + 12:
            local = bytes(control[data + 8:data + 12])  # in_pktinfo.ipi_addr
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and length >= _CMSG.size + 16:
            local = bytes(control[data:data + 16])  # in6_pktinfo.ipi6_addr
        elif level == SOL_UDP and kind == UDP_GRO and length >= _CMSG.size + 2:
            # an int (a u16 in older kernels), host order
            width = min(4, length - _CMSG.size)
            segment = int.from_bytes(control[data:data + width], sys.byteorder)
        at += socket.CMSG_SPACE(length - _CMSG.size)
    return local, segment


def decode_address(name: bytes) -> tuple[object, ...]:
    """A raw sockaddr_in / sockaddr_in6 as the socket module writes addresses."""
    family = int.from_bytes(name[:2], sys.byteorder)  # sa_family_t: host order
    port = int.from_bytes(name[2:4], "big")
    if family == socket.AF_INET6:
        flowinfo = int.from_bytes(name[4:8], "big")
        scope_id = int.from_bytes(name[24:28], sys.byteorder)
        return (socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flowinfo, scope_id)
    return (socket.inet_ntop(socket.AF_INET, name[4:8]), port)


def local_ip(raw: bytes) -> str:
    """A raw local address from `Receiver.message` as text."""
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
