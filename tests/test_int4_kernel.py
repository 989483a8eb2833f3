"""levers/int4_kernel.py, the Triton 4-bit GEMMs of `int4_matmul: triton`, run in Triton's
interpreter on the CPU (tests/int4_kernel_cases.py, in its own process) against bitsandbytes'
dequantize of real `Params4bit` weights: the forward with and without bias and the input's
gradient, each whole and with its reduction split in three, double-quantized absmax or not,
float16 and float32, a row count that is no multiple of the launch blocks; and the forward
compiled for Hopper (no GPU needed) keeping its decode in registers. On the GPU
`bench/gpu_bnb4_paths.py kernel` checks and times it. Needs Triton >= 3.9 (older
interpreters fail under NumPy >= 2.4); `make install` adds it beside a CPU build of torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip("Triton's interpreter needs >= 3.9 here", allow_module_level=True)

CASES = Path(__file__).with_name("int4_kernel_cases.py")


@pytest.fixture(scope="module")
def results() -> dict:
    done = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=CASES.parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_case_ran(results):
    assert len(results) == 24


KINDS = ["forward", "forward-bias", "forward-split3", "forward-bias-split3", "gradient", "gradient-split3"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quant", ["nested", "plain"])
def test_float16_matches_bitsandbytes_dequantize(results, kind, quant):
    err, scale = results[f"{kind}-float16-{quant}"]
    assert scale > 1 and err <= 2e-3 * scale, (err, scale)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_differs_only_by_summation_order(results, kind):
    """Each tile is formed as bitsandbytes forms the weight (code * absmax in float32)."""
    err, scale = results[f"{kind}-float32-nested"]
    assert err <= 1e-5 * scale, (err, scale)


def test_forward_decodes_straight_into_the_tensor_cores_operand():
    """Compiled for Hopper (no GPU needed), the forward's decoded tiles never pass through shared
    memory: with the PTX lookup every step from the loaded codes to the product is elementwise,
    so Triton decodes in the layout the tensor cores read W from (the kernel's whole speed-up;
    a gather in that chain, or a scalar broadcast into it, silently costs it)."""
    import re

    import bitsandbytes.functional as bnbf
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from shomin.tasks.models.levers import int4_kernel, int4_lookup
    high, low = int4_lookup.ptx(tuple(bnbf.get_4bit_type("nf4", device="cpu").tolist()))
    fn = int4_kernel._forward
    pointers = dict(a_ptr="*bf16", packed_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32", bias_ptr="*bf16",
                    c_ptr="*bf16")
    ints = dict.fromkeys(["M", "N", "K", "cols", "stride_ah", "stride_am", "stride_cm", "stride_cs", "k_per_split"], "i32")
    launch = int4_kernel.blocks(96, 64, transposed=False)
    const = dict(HAS_BIAS=False, QBLOCK=64, PTX_HI=high, PTX_LO=low,
                 **{k: v for k, v in launch.items() if k.startswith("BLOCK")})
    signature = {**pointers, **ints, **dict.fromkeys(const, "constexpr")}
    # what a launch on real tensors tells Triton: pointers and sizes are multiples of 16
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in signature
               if k not in const and k != "M"}
    compiled = triton.compile(ASTSource(fn, signature, const, aligned), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
    ttgir = compiled.asm["ttgir"]
    assert "warp_group_dot" in ttgir and "elementwise_inline_asm" in ttgir
    assert not re.findall(r"local_alloc %\S+ : \(tensor<\d+x\d+xbf16", ttgir)
