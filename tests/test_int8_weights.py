"""Frozen 8-bit layers computed weight-only (tasks/models/levers/int8_weights.py), on real
bitsandbytes `Linear8bitLt` layers quantized on the CPU: the result and the input gradient
equal x @ W^T with W = CB * SCB / 127 taken exactly, in one chunk and in many; nothing of
the input is kept for the backward; and a LoRA model whose base layers are routed through
it trains exactly as the 16-bit model holding the same dequantized weights."""
import pytest
import torch
from tests.helpers import assert_trains_alike
from shomin.tasks.models.levers import int8_weights

bnb = pytest.importorskip("bitsandbytes")


def quantized(linear: torch.nn.Linear):
    """linear's weight as bitsandbytes stores it for an 8-bit load (int8 rows + per-row absmax)."""
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")   # quantizes


def exact_weight(q, dtype=torch.float64) -> torch.Tensor:
    scb = q.state.SCB if q.state.SCB is not None else q.weight.SCB
    return q.weight.data.to(dtype) * (scb.to(dtype) / 127).unsqueeze(1)


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 7 * 8 * 48])   # one chunk; 7 rows a chunk, the last short
def test_matches_the_dequantized_weight_and_keeps_no_input(monkeypatch, chunk_bytes):
    monkeypatch.setattr(int8_weights, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(48, 30))
    assert int8_weights.use_weight_only(torch.nn.Sequential(q)) == 1
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    w = exact_weight(q)
    ref = x.detach() @ w.T + q.bias.detach()
    assert torch.allclose(y, ref, rtol=0, atol=1e-6)   # W is rounded once, in float32
    assert not any(t.data_ptr() == x.data_ptr() for t in saved), "the input was kept for the backward"
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, rtol=0, atol=1e-6)


def test_a_bias_that_trains_gets_its_gradient():
    torch.manual_seed(1)
    q = quantized(torch.nn.Linear(16, 8))
    int8_weights.use_weight_only(torch.nn.Sequential(q))
    q.bias.requires_grad_(True)
    x = torch.randn(3, 16, dtype=torch.float64)
    q(x).sum().backward()
    assert torch.allclose(q.bias.grad, torch.full((8,), 3.0, dtype=torch.float64))


def test_a_lora_model_on_routed_8bit_layers_trains_like_the_16bit_model_of_the_same_weights():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25)
    eight, plain = GPTNeoXForCausalLM(config), GPTNeoXForCausalLM(config)
    for layer_8, layer_p in zip(eight.gpt_neox.layers, plain.gpt_neox.layers):
        for owner_8, owner_p, name in ((layer_8.attention, layer_p.attention, "query_key_value"),
                                       (layer_8.attention, layer_p.attention, "dense"),
                                       (layer_8.mlp, layer_p.mlp, "dense_h_to_4h"), (layer_8.mlp, layer_p.mlp, "dense_4h_to_h")):
            q = quantized(getattr(owner_8, name))
            setattr(owner_8, name, q)
            getattr(owner_p, name).weight.data = exact_weight(q, torch.float32)
            getattr(owner_p, name).bias.data = q.bias.data.clone()
    plain.load_state_dict({k: v for k, v in eight.state_dict().items() if "layers" not in k}, strict=False)
    assert int8_weights.use_weight_only(eight) == 8
    assert_trains_alike(eight, plain)
