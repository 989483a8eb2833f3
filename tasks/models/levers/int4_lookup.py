"""The code-table lookup of `int4_matmul: triton` (levers/int4_kernel.py) as PTX: four 4-bit
codes to their float32 table values with byte permutes (`prmt`) of the table held as
immediates, so the decode is elementwise.

Why elementwise matters: on Hopper the tensor cores can take the left operand of a product
from registers, and Triton then decodes each loaded tile straight into that operand's layout,
but only through elementwise steps; a gather from a register table (what the kernel does
under Triton's interpreter) sends every decoded tile through shared memory first. Measured on
the 20B layers at 96 rows (H100, bench/gpu_bnb4_paths.py kernel): the forward 0.79 -> 0.55 ms a
layer (operands swapped so the decode can be hoisted, and the reduction split where W has few
row tiles), the input's gradient 1.00 -> 0.78 ms from this lookup alone.

The values are the table's own float32 bits (not rounded to 16 bits), so the kernel still
forms code[nibble] * absmax in float32 exactly as bitsandbytes' dequantize does. No Triton or
GPU here: tests/test_int4_lookup.py runs this text through a model of the instructions it uses.
"""
from __future__ import annotations

import functools
import struct


def _planes(code: tuple[float, ...]) -> list[list[int]]:
    """planes[j][q]: byte j of the float32 values code[4q .. 4q+3], packed into one 32-bit word."""
    bits = [struct.unpack("<I", struct.pack("<f", c))[0] for c in code]
    return [[sum(((bits[4 * q + e] >> (8 * j)) & 0xFF) << (8 * e) for e in range(4)) for q in range(4)]
            for j in range(4)]


def _lookup(code: tuple[float, ...], high: bool) -> str:
    """PTX: $0..$3 = code[nibble] for the four bytes of $4, the high nibble of each when `high`."""
    planes = _planes(code)
    lines = ["{", ".reg .b32 n, s, m, x, lo, hi, b0, b1, b2, b3, t0, t1, t2, t3;"]
    if high:   # n: each byte's code without its top bit; x: the top bit at bit 7 of its byte
        lines += ["shr.b32 n, $4, 4;", "and.b32 n, n, 0x07070707;", "mov.b32 x, $4;"]
    else:
        lines += ["and.b32 n, $4, 0x07070707;", "shl.b32 x, $4, 4;"]
    # prmt takes byte i's selector from bits 4i..4i+3; gathering four bytes' selectors into the
    # low 16 bits cheaply leaves them in the order 0, 2, 1, 3 (undone at the end)
    lines += ["shr.b32 s, n, 12;", "or.b32 s, s, n;",
              "prmt.b32 m, x, 0, 0xB9A8;"]   # 0xFF where the code is 8..15 (same 0, 2, 1, 3 order)
    for j, (q0, q1, q2, q3) in enumerate(planes):   # byte j of each value: codes 0-7, 8-15, pick by m
        lines += [f"prmt.b32 lo, {q0:#x}, {q1:#x}, s;", f"prmt.b32 hi, {q2:#x}, {q3:#x}, s;",
                  f"lop3.b32 b{j}, lo, hi, m, 0xD8;"]   # (lo & ~m) | (hi & m)
    # transpose 4 values x 4 bytes back into 4 words, in the inputs' order
    lines += ["prmt.b32 t0, b0, b1, 0x5140;", "prmt.b32 t1, b0, b1, 0x7362;",
              "prmt.b32 t2, b2, b3, 0x5140;", "prmt.b32 t3, b2, b3, 0x7362;",
              "prmt.b32 $0, t0, t2, 0x5410;", "prmt.b32 $2, t0, t2, 0x7632;",
              "prmt.b32 $1, t1, t3, 0x5410;", "prmt.b32 $3, t1, t3, 0x7632;", "}"]
    return "\n".join(lines)


@functools.cache
def ptx(code: tuple[float, ...]) -> tuple[str, str]:
    """The lookups of a 16-entry table (bitsandbytes' `quant_state.code`, as floats): the high
    nibble of each byte (the even code), then the low one (the odd code)."""
    if len(code) != 16:
        raise ValueError(f"a 4-bit code table has 16 entries, not {len(code)}")
    return _lookup(code, True), _lookup(code, False)
