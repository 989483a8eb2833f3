"""Run by tests/test_int4_kernel.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it
when triton.language is first imported): each case of levers/int4_kernel.py's GEMM against
bitsandbytes' own dequantize, printed as one JSON line {case: [max error, max |reference|]}."""
import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from shomin.tasks.models.levers import int4_kernel


def stored(rows: int, cols: int, nested: bool, dtype):
    """A 4-bit weight as a Linear4bit stores it, its float32 absmax per block, and its dequantized copy."""
    torch.manual_seed(rows + cols)
    param = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=dtype), requires_grad=False, quant_type="nf4",
                              compress_statistics=nested).to("cpu")
    state = param.quant_state
    absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if nested else state.absmax.float()
    return param.data.view(-1), absmax, state, bnbf.dequantize_4bit(param.data, state).to(dtype)


def case(rows, cols, nested, dtype, bias, transposed, split=None):
    packed, absmax, state, dense = stored(rows, cols, nested, dtype)
    torch.manual_seed(1)
    a = torch.randn(7, rows if transposed else cols, dtype=dtype)
    b = torch.randn(rows, dtype=dtype) if bias else None
    out = int4_kernel.matmul(a, packed, absmax, state.code, (rows, cols), state.blocksize, b, transposed, split=split)
    ref = a.float() @ (dense.float() if transposed else dense.float().T) + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    return [(out.float() - ref).abs().max().item(), ref.abs().max().item()]


if __name__ == "__main__":
    results = {}
    # 200 rows: not a multiple of any block; 320 columns: five absmax blocks
    for dtype in (torch.float16, torch.float32):
        for nested in (True, False):
            tag = f"{str(dtype)[6:]}-{'nested' if nested else 'plain'}"
            results[f"forward-{tag}"] = case(200, 320, nested, dtype, False, False)
            results[f"forward-bias-{tag}"] = case(200, 320, nested, dtype, True, False)
            results[f"forward-split3-{tag}"] = case(200, 320, nested, dtype, False, False, split=3)
            results[f"forward-bias-split3-{tag}"] = case(200, 320, nested, dtype, True, False, split=3)
            results[f"gradient-{tag}"] = case(200, 320, nested, dtype, False, True, split=1)
            results[f"gradient-split3-{tag}"] = case(200, 320, nested, dtype, False, True, split=3)
    print(json.dumps(results))
