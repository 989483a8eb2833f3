"""The memory plan: each stage's peak predicted term by term, before anything loads.

Loading a 20B model only to die of OOM in step one of training wastes minutes and
says nothing useful. This stage reads the model's *config* (never its weights),
builds the architecture on the meta device, and predicts each heavy stage's peak
memory term by term. When the peak exceeds `headroom` x free memory it raises a
one-line `MemoryPlanError` naming the settings to lower. The primitives are here; each
stage's own terms are a `plan` function in its stage module (its registry entry), and
`plan_memory` adds them up.

The arithmetic, per stage (B = bytes; p = parameters; b = batch rows; s = tokens;
h = hidden size; L = layers; V = vocab):
  weights     none: p x dtype B (float32 4, bf16/fp16 2; auto = 4 on cpu, 2 on cuda).
              bitsandbytes quantizes only the Linear weights of the blocks; embeddings,
              lm_head, norms and biases stay at the load dtype (16-bit on GPU):
              8bit = 1 B + one fp32 scale per output row (~4/h B);
              4bit = 0.5 B + one fp32 absmax per 64 weights (0.0625 B), or with double
              quant an 8-bit absmax (1/64 B) + one fp32 per 256 blocks.
  lora        r x (in + out) per adapted Linear, kept in fp32: weight + grad = 8 B/param.
  optimizer   AdamW's two fp32 moments = 8 B/param (16 B/param with lora).
  activations Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
              Transformer Models": 34·s·b·h bytes per layer at 16-bit, leaving out the
              5·a·s²·b attention-score term that SDPA/flash attention never stores.
              Scaled by dtype B / 2 (68·s·b·h in float32). With gradient checkpointing
              only each layer's input survives (2·s·b·h at 16-bit) plus one layer's full
              set during its recomputation. LoRA on a frozen base still backpropagates
              through every layer, so the term is the same as full fine-tuning.
  logits      b x s x V x 4 B x 2: fp32 logits and their gradient (the largest single
              tensor for small models with big vocabularies).
  generation  KV cache of PPO rollouts: 2 x L x batch x (query_max + response_max) x
              kv_dim x dtype B (kv_dim = h without grouped-query attention).
  sft levers  frozen_dtype float32 (PEFT's k-bit preparation): unquantized weights and the
              checkpointed residual stream in 4 B; offload_checkpoints: no checkpoints on
              the GPU; fused_lora under checkpointing: + one layer's weights at 16-bit (kept
              from the recompute for its backward). TRL >= 1.16 computes the loss from the
              hidden states in chunks of 4096 tokens x 32768 vocab entries.
Stage peaks: sft = weights + lora + optimizer + checkpoints + activations + logits, where
under checkpointing only the larger of activations and logits counts (the LM head's
backward and the layers' recomputes come one after the other);
merge = p x merge dtype B in CPU RAM (merge always runs on the CPU);
ppo = weights at ppo.quantization + lora states + value head (16 B x (h+1)) +
max(generation, activations + logits of one mini batch) — rollouts and updates
alternate, and the reference policy is the same weights with the adapter disabled;
evaluate = weights + max(one layer's activations + fp32 logits, generation KV cache).
  lora dropout (sft) (dtype B + 1) x s x b x in_features per adapted layer: the dropped-out
              input copy and its mask (one layer's worth under checkpointing); none with
              fused_lora, which keeps the input itself and draws the mask again.
  mlp chunks  (sft, mlp_chunk_tokens c) the MLP's share of a layer's activations, 19 of the
              34·s·b·h, counts min(s·b, c) tokens instead of s·b.
  backward    (sft under checkpointing) + 17·s·b·h at 16-bit: what a layer's backward holds
              beside its saved activations (the gradients flowing through it, the next
              layer's prefetched input, the final norm and the loss's hidden states). Fitted
              on eleven H100 peaks (bench/plan_check.py): without it the plan was 5-15% low
              at 8k tokens and 25-36% low at 64k-122k.
Checked against peaks measured on an H100 by bench/plan_check.py (bench/results.json),
stock and shomin SFT on llama7b/neox7b and PPO on neox20b (README "Benchmarks").
"""
# Over ~300 lines because of the docstring above: it states every formula the plan uses.
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel
from shomin.tasks.ground import hub
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.settings import EMBEDDED_PREFIX, LoraSettings, ModelSpec

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
K_ACT = 34  # bytes per s·b·h per layer at 16-bit (Korthikanti et al. 2022, no attention scores)
K_MLP = 19  # of which the MLP's (its input, two 4h-wide tensors and a dropout mask)
K_BWD = 17  # bytes per s·b·h at 16-bit beside those while a checkpointed layer runs its backward (fitted, see sft)


class MemoryPlan(BaseModel):
    """Top-level terms describe the main training stage (sft, else ppo, else evaluate);
    `stages` has every present stage's terms and total."""
    device: str
    device_total_bytes: int | None
    device_free_bytes: int | None
    ram_free_bytes: int | None = None
    headroom: float = 1.0
    device_cap_gib: float | None = None   # the pipeline's device_memory_gib, when it sets one
    num_parameters: int
    bytes_per_param: float
    weights_bytes: int
    lora_params: int
    lora_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    generation_bytes: int
    peak_bytes: int
    peak_stage: str
    fits: bool | None
    stages: dict[str, dict[str, int]] = {}
    notes: dict[str, str] = {}
    memory: dict[str, str] = {}   # stage -> "device" or "host" (where its peak lives)
    hints: dict[str, str] = {}    # stage -> what to lower when it does not fit

    def _capped(self) -> str:
        return "" if self.device_cap_gib is None else f" (held to device_memory_gib {self.device_cap_gib:g})"

    def table(self) -> str:
        """Human-readable, one term per line, in GiB (for `shomin plan` and plan.txt)."""
        def gib(n: int | None) -> str:
            return "unknown" if n is None else f"{n / GIB:9.3f} GiB"
        ram = "" if self.device == "cpu" else f", CPU RAM free {gib(self.ram_free_bytes).strip()}"
        lines = [f"memory plan on {self.device}: {self.num_parameters / 1e9:.3f} B parameters, "
                 f"{self.bytes_per_param:.4f} B per block Linear weight",
                 f"  device total {gib(self.device_total_bytes).strip()}, free {gib(self.device_free_bytes).strip()}"
                 f"{self._capped()}, headroom {self.headroom:.0%}{ram}"]
        for stage, terms in self.stages.items():
            where = "CPU RAM" if self.memory.get(stage) == "host" or self.device == "cpu" else self.device
            lines.append(f"{stage} ({where})")
            for term, n in terms.items():
                note = f"   {self.notes[f'{stage}.{term}']}" if f"{stage}.{term}" in self.notes else ""
                lines.append(f"  {term:<13}{gib(n)}{note}")
        verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown (free memory unknown)"}[self.fits]
        lines.append(f"peak: {self.peak_stage} {gib(self.peak_bytes).strip()} -> {verdict}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- model shape (no weights)


def model_config(spec: ModelSpec, cache_dir: str | None = None):
    """The model's config alone: from the local folder, the embedded GGUF's metadata, or the
    hub's config.json (a single small file)."""
    from transformers import AutoConfig
    hub.check_source(spec)
    src, trust = spec.source, spec.trust_remote_code
    if src.startswith(EMBEDDED_PREFIX):
        name = hub.embedded_name(spec)
        converted = hub.embedded_folder(name, cache_dir)
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(str(converted))
        folder, gguf_file = hub.embedded_gguf(name)  # GGUF metadata only: ~3 s, no tensors dequantized
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if not hub.is_hub_id(src):
        return AutoConfig.from_pretrained(str(Path(src).expanduser()), trust_remote_code=trust)
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(src, "config.json", revision=spec.revision, cache_dir=str(hub.cache_root(cache_dir) / "hub"))
    except Exception as e:  # offline, unknown or gated repo
        raise ConfigError(f"model.source: cannot fetch config.json of '{src}' from the hub ({type(e).__name__}); "
                          "check the id and network, or unset HF_HUB_OFFLINE") from None
    return AutoConfig.from_pretrained(str(Path(path).parent), trust_remote_code=trust)


def model_shape(spec: ModelSpec, cache_dir: str | None = None) -> dict:
    """Sizes the plan needs, from the config alone (see `shape_from_config`)."""
    return shape_from_config(model_config(spec, cache_dir), spec.trust_remote_code)


def shape_from_config(config, trust_remote_code: bool = False) -> dict:
    """Build the model on the meta device and measure it. `linears` groups the Linear
    layers LoRA can adapt and bitsandbytes quantizes (all but the output layer) by name
    with the layer index as `*`: {name: [in, out, count]}."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from shomin.tasks.models.loading import MODEL_CREATION
    with MODEL_CREATION:   # a load in another thread swaps tie_weights out for its duration
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model.tie_weights()  # init_empty_weights skips tying (and undoes it inside); untied heads count twice
    output = model.get_output_embeddings()
    linears: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if mod is output or not isinstance(mod, (torch.nn.Linear, Conv1D)):
            continue
        fan_in, fan_out = (mod.in_features, mod.out_features) if isinstance(mod, torch.nn.Linear) \
            else tuple(mod.weight.shape)  # GPT-2's Conv1D stores (in, out)
        key = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        linears.setdefault(key, [fan_in, fan_out, 0])[2] += 1
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size, "intermediate_size": getattr(config, "intermediate_size", None),
        "num_attention_heads": heads, "kv_dim": head_dim * (getattr(config, "num_key_value_heads", None) or heads),
        "linear_params": sum(i * o * n for i, o, n in linears.values()), "linears": linears,
    }


def lora_params(shape: dict, lora: LoraSettings) -> int:
    """r x (in + out) per adapted layer. Matching follows PEFT: 'all-linear' = every Linear
    but the output layer; a list matches a name or a dotted suffix; another string is a
    regex on the full name (layer indices read as 0 here)."""
    return sum(lora.r * (i + o) * n for name, (i, o, n) in shape["linears"].items() if targets_hit(name, lora.target_modules))


# ---------------------------------------------------------------- the arithmetic


def weights(shape: dict, quantization: str, spec: ModelSpec, device: str) -> tuple[int, float, int]:
    """(bytes, bytes per quantized weight, dtype bytes of everything else) — see module doc."""
    load = spec.compute_dtype if quantization == "4bit" else spec.dtype
    other = DTYPE_BYTES[load] if load != "auto" else (2 if device == "cuda" else 4)
    if quantization == "none":
        return shape["num_parameters"] * other, float(other), other
    if quantization == "8bit":
        per = 1.0 + 4 / shape["hidden_size"]
    else:
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if spec.bnb_4bit_use_double_quant else 4 / 64)
    q = shape["linear_params"]
    return round(q * per + (shape["num_parameters"] - q) * other), per, other


def activations(b: int, s: int, shape: dict, dtype_bytes: int, checkpointing: bool, with_inputs: bool = True,
                mlp_chunk: int = 0) -> int:
    """All layers' activations, or under checkpointing one layer's (+ every layer's saved input
    unless `with_inputs` is False: the SFT plan counts those as its own term). `mlp_chunk`:
    the MLP runs over at most that many tokens at a time, so its share (K_MLP of K_ACT) is
    held for one chunk's tokens only."""
    h, layers, k = shape["hidden_size"], shape["num_hidden_layers"], K_ACT * dtype_bytes / 2
    per_layer = k * s * b * h
    if mlp_chunk and s * b > mlp_chunk:
        per_layer -= K_MLP * dtype_bytes / 2 * (s * b - mlp_chunk) * h
    if checkpointing:
        return round(layers * dtype_bytes * s * b * h * with_inputs + per_layer)
    return round(layers * per_layer)


def lora_dropout(b: int, s: int, shape: dict, lora: LoraSettings, dtype_bytes: int, checkpointing: bool) -> int:
    """LoRA with dropout > 0 keeps, per adapted layer, the dropped-out copy of its input
    (dtype B) and the mask (1 B) for backward: (dtype B + 1) x s x b x in_features.
    Measured on H100 (bench/plan_check.py), this is what a 34·s·b·h estimate misses.
    With checkpointing only the recomputed layer holds it."""
    if lora.dropout == 0:
        return 0
    per_model = sum(i * n for name, (i, o, n) in shape["linears"].items() if targets_hit(name, lora.target_modules))
    total = (dtype_bytes + 1) * s * b * per_model
    return round(total / shape["num_hidden_layers"]) if checkpointing else total


def targets_hit(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name.replace("*", "0")) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def logits(b: int, s: int, shape: dict, with_grad: bool = True, dtype_bytes: int = 4, chunked: bool = False) -> int:
    """fp32 logits (+ their gradient); a 16-bit model also keeps its own 16-bit logits
    (and their gradient) beside the fp32 upcast the loss makes. `chunked`: TRL's fused LM
    head, which holds at most 4096 tokens x 32768 vocab entries in fp32 at a time."""
    if chunked:
        return min(b * s, 4096) * min(shape["vocab_size"], 32768) * 4 * (2 if with_grad else 1)
    per = 4 + (dtype_bytes if dtype_bytes < 4 else 0)
    return b * s * shape["vocab_size"] * per * (2 if with_grad else 1)


def kv_cache(b: int, s: int, shape: dict, dtype_bytes: int) -> int:
    return 2 * shape["num_hidden_layers"] * b * s * shape["kv_dim"] * dtype_bytes


def adapter_training(inputs: "PlanInputs", quantization: str, lora: LoraSettings, rows: int, seq: int,
                     checkpointing: bool, logit_rows: int | None = None) -> dict[str, int]:
    """The terms every LoRA trainer on the merged model shares (reward_model, dpo, grpo): weights at
    its quantization, LoRA weight + grad and AdamW's moments, one forward's activations for `rows`
    sequences of `seq` tokens, and the fp32 logits (+ grad) of `logit_rows` of them (default all;
    0 for a classifier head)."""
    shape = inputs.shape
    w, _, pb = weights(shape, quantization, inputs.spec, inputs.device)
    n_lora = lora_params(shape, lora)
    act = activations(rows, seq, shape, pb, checkpointing)
    head = logits(rows if logit_rows is None else logit_rows, seq, shape, dtype_bytes=pb)
    return {"weights": w, "lora": 8 * n_lora, "optimizer": 8 * n_lora, "activations": act, "logits": head}


def chunked_lm_head() -> bool:
    """TRL >= 1.16 computes the SFT loss from the hidden states in chunks (never all the logits)."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("trl").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (1, 16)




# ---------------------------------------------------------------- adding up the stages


@dataclass
class PlanInputs:
    """What a stage's `plan` function gets besides its own settings. `weights`, `per` and
    `act_bytes` are the pipeline's base model at model.quantization (see `weights`)."""
    spec: ModelSpec
    shape: dict
    device: str
    weights: int
    per: float
    act_bytes: int
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageTerms:
    """A present stage as the plan sees it: its terms function and settings, where its peak
    lives, and what to lower (for the one-line failure)."""
    terms: Callable[..., dict[str, int]]
    settings: object
    memory: str = "device"
    hint: str = ""


def plan_memory(stages: dict[str, StageTerms], spec: ModelSpec, shape: dict, device: str,
                free_bytes: int | None, total_bytes: int | None, *, headroom: float = 1.0,
                ram_free_bytes: int | None = None, cap_gib: float | None = None) -> MemoryPlan:
    """Predict each stage's peak on `device` (cpu or cuda). Host-memory stages (merge) are
    checked against `ram_free_bytes`; on cpu RAM is the device. The top-level terms are the
    first training stage's (one with LoRA terms), else the largest stage's."""
    ram_free = free_bytes if device == "cpu" else ram_free_bytes
    w, per, act_b = weights(shape, spec.quantization, spec, device)
    inputs = PlanInputs(spec, shape, device, w, per, act_b)
    planned = {name: st.terms(st.settings, inputs) for name, st in stages.items()}
    for terms in planned.values():
        terms.setdefault("total", sum(terms.values()))

    def budget(name: str) -> int | None:
        return ram_free if stages[name].memory == "host" else free_bytes
    verdicts = [None if budget(k) is None else planned[k]["total"] <= headroom * budget(k) for k in planned]
    fits = False if False in verdicts else (None if None in verdicts else True)
    peak_stage = max(planned, key=lambda k: planned[k]["total"], default="none")
    trains = [k for k in planned if "lora" in planned[k]]
    main = planned[trains[0]] if trains else (planned[peak_stage] if planned else {"weights": w})
    return MemoryPlan(
        device=device, device_total_bytes=total_bytes, device_free_bytes=free_bytes, ram_free_bytes=ram_free,
        headroom=headroom, device_cap_gib=cap_gib, num_parameters=shape["num_parameters"], bytes_per_param=per, weights_bytes=main["weights"],
        lora_params=main.get("lora", 0) // 8, lora_bytes=main.get("lora", 0), optimizer_bytes=main.get("optimizer", 0),
        activation_bytes=main.get("activations", main.get("forward", 0)), logits_bytes=main.get("logits", 0),
        generation_bytes=max((planned[k].get("generation", 0) for k in trains), default=0),
        peak_bytes=planned[peak_stage]["total"] if planned else 0, peak_stage=peak_stage, fits=fits,
        stages=planned, notes=inputs.notes,
        memory={k: st.memory for k, st in stages.items()}, hints={k: st.hint for k, st in stages.items()})


def failure(plan: MemoryPlan) -> str:
    """One line for the worst stage: its peak, the budget it was held to, what to lower."""
    def budget(stage: str) -> int | None:
        return plan.ram_free_bytes if plan.memory.get(stage) == "host" else plan.device_free_bytes
    over = [k for k in plan.stages if budget(k) is not None and plan.stages[k]["total"] > plan.headroom * budget(k)]
    worst = max(over, key=lambda k: plan.stages[k]["total"] / max(budget(k), 1))
    host = plan.memory.get(worst) == "host" and plan.device != "cpu"
    where = "CPU RAM" if host or plan.device == "cpu" else plan.device
    return (f"env_check: predicted {worst} peak {plan.stages[worst]['total'] / GIB:.2f} GiB exceeds "
            f"{plan.headroom:.0%} of {budget(worst) / GIB:.2f} GiB free {where}{'' if host else plan._capped()}; "
            f"{plan.hints.get(worst, '')} "
            "(or set stages.env_check.enforce_memory_plan: false)")


def oom_message(stage: str, hint: str, predicted_gib: float | None = None, cap_gib: float | None = None) -> str:
    """One line for a CUDA out-of-memory in `stage`: what the plan predicted, what to lower."""
    total = None
    if torch.cuda.is_available():
        try:
            total = torch.cuda.get_device_properties(0).total_memory / GIB
        except Exception:  # noqa: BLE001 - a number in a message must never mask the OOM
            total = None
    plan = (f"the memory plan predicted a {stage} peak of {predicted_gib:.2f} GiB" if predicted_gib is not None
            else "no memory plan for this run (add stage env_check, or see `shomin plan`)")
    gpu = f" on a {total:.1f} GiB GPU" if total else ""
    if cap_gib is not None:
        gpu += f" held to device_memory_gib {cap_gib:g}"
    return f"{stage}: CUDA out of memory; {plan}{gpu}; {hint}"
