"""A tiny eBPF assembler: named registers and opcodes, each instruction
encoded as the kernel's 8-byte `struct bpf_insn` (linux/bpf.h).

    code:u8  dst_reg:4 src_reg:4 (dst in the low nibble)  off:s16  imm:s32

Only what uproxy's programs use: 64-bit ALU with an immediate or a register,
loads and stores through a register, a 64-bit immediate load of a map's
descriptor (two slots), helper calls, conditional jumps and exit. Pure: no
I/O, so the encoding is tested byte for byte.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Registers: r0 return value, r1-r5 arguments, r6-r9 callee-saved, r10 frame pointer.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# Instruction classes.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# Sizes.
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
# Modes.
IMM, MEM = 0x00, 0x60
# Source: an immediate (K) or a register (X).
K, X = 0x00, 0x08
# ALU operations.
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0)
# Jump operations (JS*: signed).
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90)
JLT, JLE, JSLT, JSLE = 0xA0, 0xB0, 0xC0, 0xD0

PSEUDO_MAP_FD = 1  # src_reg of a 64-bit immediate load: imm is a map's descriptor

_INSN = struct.Struct("<BBhi")


class Insn(NamedTuple):
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return _INSN.pack(self.code, (self.src << 4) | self.dst, self.off, self.imm)


def mov(dst: int, src: int) -> Insn:
    """dst = src (64-bit registers)."""
    return Insn(ALU64 | MOV | X, dst, src)


def mov_imm(dst: int, imm: int) -> Insn:
    return Insn(ALU64 | MOV | K, dst, imm=imm)


def add_imm(dst: int, imm: int) -> Insn:
    return Insn(ALU64 | ADD | K, dst, imm=imm)


def add(dst: int, src: int) -> Insn:
    """dst += src (64-bit)."""
    return Insn(ALU64 | ADD | X, dst, src)


def sub(dst: int, src: int) -> Insn:
    """dst -= src (64-bit)."""
    return Insn(ALU64 | SUB | X, dst, src)


def load(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)"""
    return Insn(LDX | MEM | size, dst, src, off)


def store(size: int, dst: int, off: int, src: int) -> Insn:
    """*(size *)(dst + off) = src"""
    return Insn(STX | MEM | size, dst, src, off)


def load_map_fd(dst: int, fd: int) -> tuple[Insn, Insn]:
    """dst = the map whose descriptor is `fd` (a 64-bit immediate: two slots)."""
    return Insn(LD | IMM | DW, dst, PSEUDO_MAP_FD, imm=fd), Insn(0)


def call(helper: int) -> Insn:
    return Insn(JMP | CALL, imm=helper)


def jump_if_imm(op: int, dst: int, imm: int, off: int) -> Insn:
    """if dst <op> imm: skip `off` instructions."""
    return Insn(JMP | op | K, dst, off=off, imm=imm)


def jump_if(op: int, dst: int, src: int, off: int) -> Insn:
    """if dst <op> src: skip `off` instructions."""
    return Insn(JMP | op | X, dst, src, off)


def exit_() -> Insn:
    return Insn(JMP | EXIT)


def assemble(*parts: Insn | tuple[Insn, ...]) -> bytes:
    """The program's bytes, flattening two-slot instructions."""
    out = bytearray()
    for part in parts:
        for insn in (part,) if isinstance(part, Insn) else part:
            out += insn.encode()
    return bytes(out)
