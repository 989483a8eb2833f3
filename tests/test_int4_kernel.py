"""levers/int4_kernel.py, the Triton 4-bit GEMM of `int4_matmul: triton`, run in Triton's
interpreter on the CPU (tests/int4_kernel_cases.py, in its own process) against bitsandbytes'
dequantize of real `Params4bit` weights: the forward with and without bias, the forward and the
input's gradient whole and with their reductions split in three, double-quantized absmax or not, float16
and float32, a row count that is no multiple of the launch blocks. On the GPU
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
