"""GPU-only checks of the kernels the SFT stage routes to (CUDA needed; CI has none).

Liger's RoPE kernel, used for GPT-NeoX by tasks/kernels.py, against transformers' own
apply_rotary_pos_emb, in float32, for full (neox7b) and partial (neox20b, 25%) rotation.
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
ok = all(v < 1e-5 for v in worst.values())
print(json.dumps({"check": "liger rope vs gpt_neox apply_rotary_pos_emb (float32)", "max_abs_diff": worst, "ok": ok}))
sys.exit(0 if ok else 1)
