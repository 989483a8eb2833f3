"""levers/int4_lookup.py: the PTX that looks up 4-bit codes in the kernel's float32 table, run
through a model of the five instructions it uses (PTX ISA semantics of shr/shl/and/or/mov,
prmt's default mode and lop3), for bitsandbytes' nf4 and fp4 tables and every byte value in
every position of the 32-bit word. The same text runs on the GPU inside the kernel
(bench/gpu_bnb4_paths.py kernel checks its products against the dense ones)."""
import struct

import pytest

from shomin.tasks.models.levers import int4_lookup

bnbf = pytest.importorskip("bitsandbytes.functional")


def _prmt(a: int, b: int, c: int) -> int:
    """Byte i of the result: byte (c's nibble i & 7) of b:a; where that nibble's bit 3 is set,
    the selected byte's top bit copied into all eight."""
    source = (a | b << 32).to_bytes(8, "little")
    out = 0
    for i in range(4):
        sel = c >> 4 * i & 0xF
        byte = source[sel & 7]
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """Bit i of the result: bit (a_i b_i c_i, read as a 3-bit number) of lut."""
    return sum((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1)) & 1) << i for i in range(32))


OPS = {"shr.b32": lambda a, s: a >> s, "shl.b32": lambda a, s: a << s & 0xFFFFFFFF, "and.b32": lambda a, b: a & b,
       "or.b32": lambda a, b: a | b, "mov.b32": lambda a: a, "prmt.b32": _prmt, "lop3.b32": _lop3}


def run(ptx: str, word: int) -> list[int]:
    """The four 32-bit outputs $0..$3 for input $4 = word."""
    regs = {"$4": word}
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, operands = line.split(None, 1)
        dest, *sources = (t.strip() for t in operands.split(","))
        regs[dest] = OPS[op](*(regs[t] if t in regs else int(t, 0) for t in sources))
    return [regs[f"${i}"] for i in range(4)]


def float_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


# every byte value in every position of the word, the other positions varying
WORDS = [b | (b * 7 + 3) % 256 << 8 | (b * 13 + 5) % 256 << 16 | (255 - b) << 24 for b in range(256)]
WORDS += [(b * 7 + 3) % 256 | b << 8 | (255 - b) << 16 | (b * 13 + 5) % 256 << 24 for b in range(256)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lookup_gives_the_tables_float32_bits(quant_type):
    code = tuple(bnbf.get_4bit_type(quant_type, device="cpu").tolist())
    high, low = int4_lookup.ptx(code)
    for word in WORDS:
        codes = [word >> 8 * i & 0xFF for i in range(4)]
        assert run(high, word) == [float_bits(code[c >> 4]) for c in codes], hex(word)
        assert run(low, word) == [float_bits(code[c & 15]) for c in codes], hex(word)


def test_a_table_of_another_size_is_refused():
    with pytest.raises(ValueError, match="16 entries"):
        int4_lookup.ptx((0.0,) * 8)
