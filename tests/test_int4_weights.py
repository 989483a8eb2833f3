"""Frozen 4-bit layers computed from their stored codes (tasks/models/levers/int4_weights.py),
on real bitsandbytes `Linear4bit` layers quantized on the CPU : the result and the input
gradient equal x @ W^T with W as bitsandbytes itself dequantizes it, with and without double
quantization, in one slice of rows and in many; nothing of the input is kept for the
backward; and a LoRA model on routed layers gets bitsandbytes' own gradients."""
import pytest
import torch
from shomin.tasks.ground.settings import LoraSettings
from shomin.tasks.models.levers import int4_weights, int8_weights

bnb = pytest.importorskip("bitsandbytes")


def quantized(linear: torch.nn.Linear, double_quant: bool = True):
    """linear's weight as bitsandbytes stores it for a 4-bit load (nf4, absmax per 64)."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                 compress_statistics=double_quant, quant_type="nf4")
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q.support_avx512bf16_for_cpu = False
    return q.to("cpu")   # quantizes


def bnb_weight(q) -> torch.Tensor:
    """W exactly as bitsandbytes dequantizes it."""
    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 7 * 4 * 128])   # one slice; 7 rows a slice, the last short
def test_matches_bitsandbytes_weight_and_keeps_no_input(monkeypatch, double_quant, chunk_bytes):
    monkeypatch.setattr(int8_weights, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(128, 30), double_quant)
    assert q.weight.quant_state.nested == double_quant
    w = bnb_weight(q)
    assert int4_weights.use_sliced(torch.nn.Sequential(q)) == 1
    x = torch.randn(2, 5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    ref = x.detach() @ w.T + q.bias.detach()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved), "the input was kept for the backward"
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)


def test_the_slices_cover_every_row_once(monkeypatch):
    monkeypatch.setattr(int8_weights, "CHUNK_BYTES", 3 * 4 * 64)
    torch.manual_seed(2)
    q = quantized(torch.nn.Linear(64, 10, bias=False))
    layout = int4_weights.Layout.of(q.weight)
    rows = int4_weights._chunks(layout, 4)
    assert rows[0][0] == 0 and rows[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    absmax = layout.absmax_float()
    whole = torch.cat([int4_weights.dequantized(q.weight.data, layout, absmax, r, torch.float32) for r in rows])
    assert torch.equal(whole, bnb_weight(q))


def test_a_lora_model_on_routed_4bit_layers_gets_bitsandbytes_gradients():
    from peft import get_peft_model
    from shomin.tasks.models.loading import lora_config
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25)
    routed, own = GPTNeoXForCausalLM(config), GPTNeoXForCausalLM(config)
    own.load_state_dict(routed.state_dict())
    for model in (routed, own):
        for layer in model.gpt_neox.layers:
            for owner, name in ((layer.attention, "query_key_value"), (layer.attention, "dense"),
                                (layer.mlp, "dense_h_to_4h"), (layer.mlp, "dense_4h_to_h")):
                setattr(owner, name, quantized(getattr(owner, name)))
    assert int4_weights.use_sliced(routed) == 8
    grads = []
    for model in (routed, own):
        torch.manual_seed(3)
        peft = get_peft_model(model, lora_config(LoraSettings(r=4, alpha=8, dropout=0.0,
                                                              target_modules=["query_key_value"])))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
        out = peft(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}))
    (loss_r, g_r), (loss_o, g_o) = grads
    assert torch.allclose(loss_r, loss_o, rtol=1e-5)
    assert g_r.keys() == g_o.keys() and len(g_r) == 4
    for name in g_r:
        assert torch.allclose(g_r[name], g_o[name], rtol=1e-4, atol=1e-6), name
