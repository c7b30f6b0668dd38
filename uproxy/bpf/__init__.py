"""eBPF without a compiler: an assembler (`asm`), the bpf(2) calls (`syscall`)
and the one program uproxy loads, the sockmap verdict (`sockmap`)."""
