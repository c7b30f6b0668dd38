"""SO_REUSEPORT groups steered by client address (classic BPF).

With `--workers N` every listener is N sockets bound to the same address,
one per worker. Left alone the kernel spreads connections by a hash of the
4-tuple, so one client's connections land on different workers and ClientIP
affinity (kept per worker) breaks. A reuseport classic-BPF program picks the
socket from the source IP alone: one client always reaches one worker.

The program reads the network header (SKF_NET_OFF), so one program serves
IPv4, IPv6 and dual-stack sockets: for IPv6 it hashes the last 4 bytes of the
source address (where IPv4-mapped and most host addresses differ). The
32-bit value is mixed by a multiplicative (Fibonacci) hash before `% N`, so
addresses that differ only in their high bytes still spread.

`worker_index` computes in Python what the kernel computes, for tests and
for people asking "which worker serves this client".

The kernel numbers a group's sockets in the order they joined it (bind for
UDP, listen for TCP) and renumbers when one closes; the control process keeps
its copy of every socket open, so the numbering holds while a worker restarts.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51  # Linux; Python 3.11 has no constant
SKF_NET_OFF = -0x100000

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS = 0x00 | 0x00 | 0x20
_LD_B_ABS = 0x00 | 0x10 | 0x20
_ALU_RSH_K = 0x04 | 0x70
_ALU_MUL_K = 0x04 | 0x20
_ALU_MOD_K = 0x04 | 0x90
_JMP_JEQ_K = 0x05 | 0x10
_RET_A = 0x06 | 0x10

HASH_MULTIPLIER = 0x9E3779B1  # 2^32 / golden ratio
HASH_SHIFT = 16

_IPV4_SOURCE = 12  # offset of the source address in the IPv4 header
_IPV6_SOURCE_TAIL = 20  # last 4 bytes of the IPv6 source address (8 + 12)


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def program(groups: int) -> list[tuple[int, int, int, int]]:
    """The instructions (code, jt, jf, k) choosing socket hash(source IP) % groups."""
    if groups < 1:
        raise ValueError(f"groups: must be at least 1, got {groups}")
    tail = [
        (_ALU_MUL_K, 0, 0, HASH_MULTIPLIER),
        (_ALU_RSH_K, 0, 0, HASH_SHIFT),
        (_ALU_MOD_K, 0, 0, groups),
        (_RET_A, 0, 0, 0),
    ]
    return [
        (_LD_B_ABS, 0, 0, _net(0)),  # version nibble
        (_ALU_RSH_K, 0, 0, 4),
        (_JMP_JEQ_K, 0, len(tail) + 1, 6),
        (_LD_W_ABS, 0, 0, _net(_IPV6_SOURCE_TAIL)),
        *tail,
        (_LD_W_ABS, 0, 0, _net(_IPV4_SOURCE)),
        *tail,
    ]


def worker_index(client_ip: str, groups: int) -> int:
    """The socket (worker) the program picks for a client address."""
    packed = ipaddress.ip_address(client_ip).packed
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":
        packed = packed[12:]  # a v4-mapped client arrives as an IPv4 packet
    value = int.from_bytes(packed[-4:], "big")
    mixed = ((value * HASH_MULTIPLIER) & 0xFFFFFFFF) >> HASH_SHIFT
    return mixed % groups


def attach(sock: socket.socket, groups: int) -> None:
    """Attach the steering program to `sock`'s reuseport group (any member will do)."""
    instructions = program(groups)
    filters = b"".join(struct.pack("HBBI", *insn) for insn in instructions)
    buffer = ctypes.create_string_buffer(filters)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(instructions), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
