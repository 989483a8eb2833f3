"""PPO's checkpoints: the adapter, the value head, the optimizer and the random state, saved
atomically through the run folder's store (tasks/ground/checkpoints.py), the last two kept,
so a stopped run resumes at the step after the last complete one with the same draws."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from shomin.tasks.ground import checkpoints as store
from shomin.tasks.ground.rundir import write_json
from shomin.tasks.models.rl import PolicyWithValue


def _complete(path: Path) -> bool:
    return (path / "trainer.json").exists()   # written last


def save_checkpoint(root: Path, step: int, policy: PolicyWithValue, optimizer, kl_coef: float, log: list) -> None:
    """Everything a resumed run needs, saved atomically; the store keeps the last two."""
    def write(tmp: Path) -> None:
        save_policy(policy, tmp)
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "state.pt")
        write_json(tmp / "trainer.json", {"step": step, "kl_coef": kl_coef, "log": log})
    store.save(root, "step", step, write, _complete)


def save_policy(policy: PolicyWithValue, folder: Path) -> None:
    policy.lm.save_pretrained(folder / "adapter", safe_serialization=True)
    save_file(policy.v_head.state_dict(), folder / "value_head.safetensors")


def checkpoints(root: Path) -> list[Path]:
    return [path for _, path in store.complete(root, "step", _complete)]


def load_checkpoint(path: Path, policy: PolicyWithValue, optimizer, kl_ctl) -> tuple[int, list]:
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(policy.lm, load_file(path / "adapter" / "adapter_model.safetensors"))
    policy.v_head.load_state_dict(load_file(path / "value_head.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    meta = json.loads((path / "trainer.json").read_text())
    kl_ctl.value = meta["kl_coef"]
    return meta["step"], meta["log"]
