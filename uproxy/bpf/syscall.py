"""The bpf(2) calls uproxy needs, through ctypes: create a map, load a
program (with the verifier's log), attach it to a map, update, delete and
walk a map's keys. Each `union bpf_attr` variant is packed by hand with the
layout of linux/bpf.h; the kernel accepts a shorter attr than its own (the
rest reads as zero).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

# Commands.
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = range(5)
PROG_LOAD, PROG_ATTACH, PROG_DETACH = 5, 8, 9
# Map types.
MAP_TYPE_HASH, MAP_TYPE_SOCKMAP, MAP_TYPE_SOCKHASH = 1, 15, 18
# Program types.
PROG_TYPE_SK_SKB = 14
# Attach types.
SK_SKB_STREAM_VERDICT, SK_SKB_VERDICT = 5, 38
# map_update_elem flags.
ANY, NOEXIST, EXIST = 0, 1, 2

LOG_SIZE = 64 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


class BpfError(OSError):
    """A bpf(2) call failed; `log` carries the verifier's words for a load."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""))
        self.log = log


def bpf(command: int, attr: bytes | bytearray, what: str) -> int:
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    result = int(_libc.syscall(SYS_BPF, command, buf, len(attr)))
    if result < 0:
        raise BpfError(ctypes.get_errno(), what)
    return result


def _address(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "") -> int:
    """A new map's descriptor (close it with os.close)."""
    attr = struct.pack("<IIIIIII16s", map_type, key_size, value_size, max_entries, 0, 0, 0,
                       name.encode()[:15])
    return bpf(MAP_CREATE, attr, "map_create")


def prog_load(prog_type: int, insns: bytes, *, license: str = "GPL", name: str = "",
              expected_attach_type: int = 0) -> int:
    """A loaded program's descriptor; on failure the error carries the verifier's log."""
    lic = ctypes.create_string_buffer(license.encode())
    code = ctypes.create_string_buffer(insns, len(insns))
    for log_level in (0, 1):  # load quietly; on failure load again for the log
        log = ctypes.create_string_buffer(LOG_SIZE if log_level else 0)
        attr = struct.pack("<IIQQIIQII16sII", prog_type, len(insns) // 8, _address(code),
                           _address(lic), log_level, LOG_SIZE if log_level else 0,
                           _address(log) if log_level else 0, 0, 0, name.encode()[:15], 0,
                           expected_attach_type)
        try:
            return bpf(PROG_LOAD, attr, "prog_load")
        except BpfError as exc:
            if log_level:
                text = log.value.decode(errors="replace").strip()
                raise BpfError(exc.errno or errno.EINVAL, "prog_load", text) from None
            if exc.errno in (errno.EPERM, errno.ENOSYS):
                raise
    raise AssertionError("unreachable")


def prog_attach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(PROG_ATTACH, struct.pack("<IIII", target_fd, prog_fd, attach_type, 0), "prog_attach")


def _elem(map_fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
          flags: int) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = struct.pack("<IIQQQ", map_fd, 0, _address(kbuf),
                       0 if value is None else _address(value), flags)
    return attr, kbuf


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr, _kbuf = _elem(map_fd, key, vbuf, flags)
    bpf(MAP_UPDATE_ELEM, attr, "map_update_elem")


def _found(cmd: int, attr: bytes | bytearray, name: str) -> bool:
    """A bpf(2) call that may find nothing: False when it says ENOENT."""
    try:
        bpf(cmd, attr, name)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key`, or None when there is none."""
    vbuf = ctypes.create_string_buffer(value_size)
    attr, _kbuf = _elem(map_fd, key, vbuf, 0)
    return vbuf.raw if _found(MAP_LOOKUP_ELEM, attr, "map_lookup_elem") else None


def map_delete(map_fd: int, key: bytes) -> None:
    attr, _kbuf = _elem(map_fd, key, None, 0)
    bpf(MAP_DELETE_ELEM, attr, "map_delete_elem")


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key in the map (BPF_MAP_GET_NEXT_KEY from none)."""
    keys: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    current: bytes | None = None
    while True:
        kbuf = None if current is None else ctypes.create_string_buffer(current, key_size)
        attr = struct.pack("<IIQQQ", map_fd, 0, 0 if kbuf is None else _address(kbuf),
                           _address(nxt), 0)
        if not _found(MAP_GET_NEXT_KEY, attr, "map_get_next_key"):
            return keys
        current = nxt.raw[:key_size]
        keys.append(current)
