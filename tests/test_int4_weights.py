"""Frozen 4-bit layers computed a slice of rows at a time (tasks/models/levers/int4_weights.py),
on real bitsandbytes `Linear4bit` layers quantized on the CPU: the result and the input
gradient equal bitsandbytes' own (its whole dequantized weight), in one slice and in many,
double-quantized or not, with and without bias; nothing of the input is kept for the
backward; no slice cuts an absmax block; a LoRA model on routed layers trains as on
bitsandbytes' own; the default routing (fused decode) leaves every CPU call to bitsandbytes;
with `int4_matmul: triton` off CUDA the slices run. (The CUDA-only fused path is checked against
bitsandbytes by `bench/gpu_bnb4_paths.py`; the Triton GEMM in tests/test_int4_kernel.py.)"""
import pytest
import torch
from tests.helpers import assert_trains_alike
from shomin.tasks.models.levers import int4_weights

bnb = pytest.importorskip("bitsandbytes")


def quantized(linear: torch.nn.Linear, nested: bool):
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=nested)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")   # quantizes
    q.support_avx512bf16_for_cpu = False   # as loading.guard_bnb_cpu does: no repacking after a no-grad forward
    return q


def whole_weight(q) -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    return bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


# one slice; 8 rows a slice; one row a slice (a row is 32 absmax blocks)
@pytest.mark.parametrize("slice_bytes", [32 << 20, 8 * 2048 * 4, 1])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_bitsandbytes_and_keeps_no_input(monkeypatch, slice_bytes, nested, bias):
    monkeypatch.setattr(int4_weights, "SLICE_BYTES", slice_bytes)
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(2048, 72, bias=bias), nested)
    w = whole_weight(q)
    assert int4_weights.use_sliced(torch.nn.Sequential(q)) == 1
    routed = q._shomin_weight4bit
    slices = routed.slices(4)
    rows = 72 if slice_bytes > 1 << 20 else 8 if slice_bytes > 1 else 1
    assert slices == [(a, min(a + rows, 72)) for a in range(0, 72, rows)]
    assert all(a * 2048 % 64 == 0 for a, _ in slices), "a slice starts inside an absmax block"
    x = torch.randn(3, 5, 2048, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    ref = x.detach() @ w.T + (q.bias.detach() if bias else 0)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved), "the input was kept for the backward"
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)


def test_16bit_inputs_come_back_16bit_and_match():
    torch.manual_seed(2)
    q = quantized(torch.nn.Linear(1024, 40, bias=False), nested=True)
    q.compute_dtype = torch.bfloat16
    w = whole_weight(q).to(torch.bfloat16)
    int4_weights.use_sliced(torch.nn.Sequential(q))
    x = torch.randn(4, 1024, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), (x.detach() @ w.T).float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad.float(), (g.float() @ w.float()), rtol=2e-2, atol=2e-2)


def test_a_lora_model_on_routed_4bit_layers_trains_as_on_bitsandbytes_own(monkeypatch):
    """The same quantized GPT-NeoX, its frozen layers routed or left to bitsandbytes: the same
    loss and LoRA gradients (several slices per layer)."""
    import copy

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    monkeypatch.setattr(int4_weights, "SLICE_BYTES", 1)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25)
    own = GPTNeoXForCausalLM(config)
    for layer in own.gpt_neox.layers:
        for owner, name in ((layer.attention, "query_key_value"), (layer.attention, "dense"),
                            (layer.mlp, "dense_h_to_4h"), (layer.mlp, "dense_4h_to_h")):
            setattr(owner, name, quantized(getattr(owner, name), nested=True))
    routed = copy.deepcopy(own)
    assert int4_weights.use_sliced(routed) == 8
    assert_trains_alike(routed, own)


def test_fused_decode_keeps_bitsandbytes_where_it_cannot_run(monkeypatch):
    """`int4_matmul: bitsandbytes`: off CUDA (and with a gradient to take) every call is
    bitsandbytes' own, unchanged; the CUDA decode path is checked by bench/gpu_bnb4_paths.py."""
    torch.manual_seed(4)
    q = quantized(torch.nn.Linear(256, 24), nested=True)
    x = torch.randn(2, 3, 256)
    before = q(x)
    assert int4_weights.use_fused_decode(torch.nn.Sequential(q)) == 1
    calls = []
    monkeypatch.setattr(int4_weights.Weight4bit, "fused", lambda self, *a: calls.append(a) or None)
    assert torch.equal(q(x), before)
    x.requires_grad_(True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert not calls, "the fused path was tried off CUDA"


def test_triton_routing_falls_back_to_slices_where_its_kernel_cannot_run(monkeypatch):
    """`int4_matmul: triton` off CUDA: the slices, with bitsandbytes' result and gradient; the
    kernel itself is checked in Triton's interpreter (tests/test_int4_kernel.py)."""
    torch.manual_seed(5)
    q = quantized(torch.nn.Linear(256, 24), nested=True)
    w = whole_weight(q)
    assert int4_weights.use_sliced(torch.nn.Sequential(q), tiled=True) == 1
    assert q._shomin_weight4bit.tiled
    monkeypatch.setattr(int4_weights, "_triton_gemm", lambda: pytest.fail("the Triton GEMM was asked for off CUDA"))
    x = torch.randn(2, 3, 256, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, x.detach() @ w.T + q.bias.detach(), rtol=1e-5, atol=1e-5)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, torch.ones(2, 3, 24) @ w, rtol=1e-5, atol=1e-5)
