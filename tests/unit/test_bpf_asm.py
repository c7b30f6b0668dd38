"""The assembler encodes each instruction to the bytes clang/llvm-objdump show
for it (`llvm-objdump -d` of the same C), slot by slot."""

from __future__ import annotations

import pytest

from uproxy.bpf import asm
from uproxy.bpf.sockmap import verdict_program


@pytest.mark.parametrize(("insn", "expected"), [
    (asm.mov(asm.R6, asm.R1), "bf 16 00 00 00 00 00 00"),           # r6 = r1
    (asm.mov_imm(asm.R4, 0), "b7 04 00 00 00 00 00 00"),            # r4 = 0
    (asm.mov_imm(asm.R0, -1), "b7 00 00 00 ff ff ff ff"),           # r0 = -1
    (asm.add_imm(asm.R3, -8), "07 03 00 00 f8 ff ff ff"),           # r3 += -8
    (asm.call(46), "85 00 00 00 2e 00 00 00"),                      # call 46
    (asm.call(72), "85 00 00 00 48 00 00 00"),                      # call 72
    (asm.exit_(), "95 00 00 00 00 00 00 00"),                       # exit
    (asm.store(asm.DW, asm.R10, -8, asm.R0), "7b 0a f8 ff 00 00 00 00"),  # *(u64 *)(r10 - 8) = r0
    (asm.load(asm.W, asm.R0, asm.R1, 136), "61 10 88 00 00 00 00 00"),    # r0 = *(u32 *)(r1 + 136)
    (asm.jump_if_imm(asm.JNE, asm.R0, 0, 2), "55 00 02 00 00 00 00 00"),  # if r0 != 0 goto +2
])
def test_instruction_bytes(insn: asm.Insn, expected: str) -> None:
    assert insn.encode().hex(" ") == expected


def test_a_map_descriptor_takes_two_slots() -> None:
    first, second = asm.load_map_fd(asm.R2, 5)  # r2 = map fd 5 (ld_imm64, BPF_PSEUDO_MAP_FD)
    assert asm.assemble((first, second)).hex(" ") == (
        "18 12 00 00 05 00 00 00 00 00 00 00 00 00 00 00")


def test_the_verdict_program_is_ten_instructions_in_eleven_slots() -> None:
    code = verdict_program(7)
    assert len(code) == 11 * 8
    slots = [code[i:i + 8].hex(" ") for i in range(0, len(code), 8)]
    assert slots[1] == "85 00 00 00 2e 00 00 00"  # get_socket_cookie
    assert slots[4] == "18 12 00 00 07 00 00 00"  # the map, as the kernel will patch it
    assert slots[9] == "85 00 00 00 48 00 00 00"  # sk_redirect_hash
    assert slots[-1] == "95 00 00 00 00 00 00 00"
