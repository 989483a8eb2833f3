"""GPU-only checks of the kernels the SFT stage routes to (CUDA needed; CI has none).

Liger's RoPE kernel, used for GPT-NeoX by tasks/kernels.py, against transformers' own
apply_rotary_pos_emb, in float32, for full (neox7b) and partial (neox20b, 25%) rotation;
Liger's LayerNorm against torch's in bf16 (output within bf16 rounding, gradient within 1%).
Usage: python bench/gpu_check_kernels.py   (prints one JSON line; exit 1 on a mismatch)
"""
import json
import sys

import torch
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox import modeling_gpt_neox

reference = modeling_gpt_neox.apply_rotary_pos_emb
worst = {}
for pct in (1.0, 0.25):
    config = GPTNeoXConfig(hidden_size=512, num_attention_heads=4, rotary_pct=pct, max_position_embeddings=256)
    rope = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 4, 128, 3 * 128, device="cuda", generator=g)   # strided q/k views, as in the model
    q, k, _ = qkv.chunk(3, dim=-1)
    cos, sin = rope(q, torch.arange(128, device="cuda")[None].expand(2, -1))
    want_q, want_k = reference(q, k, cos, sin)
    got_q, got_k = liger_rotary_pos_emb(q.clone(), k.clone(), cos, sin)
    worst[f"rotary_pct={pct}"] = max((got_q - want_q).abs().max().item(), (got_k - want_k).abs().max().item())
# Liger's LayerNorm (GPT-NeoX's norms) against torch's, bf16 activations as in training
from liger_kernel.functional import layer_norm  # noqa: E402
x = torch.randn(4, 256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ln = torch.nn.LayerNorm(4096, device="cuda", dtype=torch.bfloat16)
torch.nn.init.normal_(ln.weight, 1.0, 0.1), torch.nn.init.normal_(ln.bias, 0.0, 0.1)
want = ln(x)
gx_want, = torch.autograd.grad(want.float().square().sum(), x)
got = layer_norm(x, ln.weight, ln.bias, ln.eps)
gx_got, = torch.autograd.grad(got.float().square().sum(), x)
worst["layer_norm_out_bf16"] = (got.float() - want.float()).abs().max().item()
worst["layer_norm_grad_rel"] = ((gx_got.float() - gx_want.float()).norm() / gx_want.float().norm()).item()
ok = all(v < 1e-5 for k, v in worst.items() if k.startswith("rotary")) \
    and worst["layer_norm_out_bf16"] < 0.07 and worst["layer_norm_grad_rel"] < 0.01
print(json.dumps({"check": "liger rope (float32) and layer norm (bf16) vs transformers/torch", "max_abs_diff": worst, "ok": ok}))
sys.exit(0 if ok else 1)
