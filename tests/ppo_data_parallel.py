"""Run by tests/test_ppo.py under `torchrun --nproc_per_node 2` (gloo on the CPU): the PPO stage
data-parallel on the tiny model; each process saves its trainable tensors before and after
training to OUT/rank{R}.pt. Usage: torchrun ... ppo_data_parallel.py MODEL DATA_JSONL OUT"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # ppo_rewards
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shomin.tasks.ground.records import DataResult, MergeResult  # noqa: E402
from shomin.tasks.ground.settings import LoraSettings, ModelSpec, RewardSettings  # noqa: E402
from shomin.tasks.stages import ppo  # noqa: E402
from tests.helpers import run_stage  # noqa: E402

model, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rank = int(os.environ["RANK"])
seen = {}
original = ppo.update


def update(model_, optimizer, accelerator, params, *a, **kw):
    seen.setdefault("before", [p.detach().clone() for p in params])
    seen["params"] = params
    return original(model_, optimizer, accelerator, params, *a, **kw)


ppo.update = update
settings = ppo.PpoSettings(reward=RewardSettings(kind="function", function="ppo_rewards:letters"), steps=2,
                           batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=5e-3, response_min_tokens=4,
                           response_max_tokens=6, init_kl_coef=0.05, target_kl=None,
                           lora=LoraSettings(r=8, alpha=16, dropout=0.0))
merge = MergeResult(stage="merge", output_dir=str(Path(model).parent), merged_path=model)
n = sum(1 for _ in open(data))
dataset = DataResult(stage="dataset", output_dir=str(out), train_path=data, eval_path=data, format="text",
                     n_train=n, n_eval=n)
run_stage("ppo", settings, out / "ppo", model=ModelSpec(source=model), inputs={"merge": merge, "dataset": dataset})
torch.save({"before": seen["before"], "after": [p.detach().clone() for p in seen["params"]],
            "log": json.loads((out / "ppo" / "ppo_log.json").read_text()) if rank == 0 else None}, out / f"rank{rank}.pt")
