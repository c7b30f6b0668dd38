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


def test_the_verdict_program_is_34_instructions_in_38_slots() -> None:
    code = verdict_program(7, 9, 11, 13)
    assert len(code) == 38 * 8
    slots = [code[i:i + 8].hex(" ") for i in range(0, len(code), 8)]
    assert slots[1] == "85 00 00 00 2e 00 00 00"  # get_socket_cookie
    assert slots[3] == "18 11 00 00 0b 00 00 00"  # r1 = the limits map
    assert slots[7] == "85 00 00 00 01 00 00 00"  # map_lookup_elem
    assert slots[8] == "15 00 15 00 00 00 00 00"  # if r0 == 0 goto +21 (the redirect)
    assert slots[9] == "79 07 00 00 00 00 00 00"  # r7 = *(u64 *)(r0 + 0)
    assert slots[10] == "18 11 00 00 09 00 00 00"  # r1 = the used map
    assert slots[15] == "15 00 0e 00 00 00 00 00"  # if r0 == 0 goto +14
    assert slots[16] == "61 61 00 00 00 00 00 00"  # r1 = skb->len
    assert slots[19] == "0f 13 00 00 00 00 00 00"  # r3 += r1
    assert slots[21] == "2d 72 08 00 00 00 00 00"  # if r2 > r7 goto +8
    assert slots[22] == "bd 73 07 00 00 00 00 00"  # if r3 <= r7 goto +7
    assert slots[23] == "18 11 00 00 0d 00 00 00"  # r1 = the ring buffer
    assert slots[29] == "85 00 00 00 82 00 00 00"  # ringbuf_output
    assert slots[30] == "bf 61 00 00 00 00 00 00"  # redirect: r1 = r6
    assert slots[31] == "18 12 00 00 07 00 00 00"  # r2 = the peers map
    assert slots[36] == "85 00 00 00 48 00 00 00"  # sk_redirect_hash
    assert slots[37] == "95 00 00 00 00 00 00 00"
