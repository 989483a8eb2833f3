"""Stage env_check: report the environment and a memory plan; fail before anything loads.

Loading a 20B model only to die of OOM in step one of training wastes minutes and
says nothing useful. This stage reads the model's *config* (never its weights),
builds the architecture on the meta device, and predicts each heavy stage's peak
memory term by term. When the peak exceeds `headroom` x free memory it raises a
one-line `MemoryPlanError` naming the settings to lower.

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
              input copy and its mask (one layer's worth under checkpointing).
Checked against peaks measured on an H100 by bench/plan_check.py (bench/results.json),
stock and shomin SFT on llama7b/neox7b and PPO on neox20b (README "Benchmarks").
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel

from tasks.config import EMBEDDED_PREFIX, ConfigError, EnvCheckSettings, LoraSettings, ModelInitSettings, ModelSpec, Pipeline
from tasks.model import EMBEDDED, cache_root, check_source, is_hub_id, resolve_device
from tasks.rundir import StageResult, staged_dir, write_json, write_text

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
K_ACT = 34  # bytes per s·b·h per layer at 16-bit (Korthikanti et al. 2022, no attention scores)
HINTS = {
    "sft": "lower stages.sft.micro_batch_size or stages.sft.max_seq_length, set model.quantization: 4bit/8bit, "
           "or turn on stages.sft.gradient_checkpointing",
    "ppo": "lower stages.ppo.mini_batch_size, stages.ppo.batch_size or stages.ppo.response_max_tokens, "
           "or set stages.ppo.quantization: 8bit/4bit",
    "evaluate": "lower stages.evaluate.batch_size or stages.evaluate.max_seq_length, or set model.quantization",
    "merge": "merge loads the whole base at 16-bit in CPU RAM; free RAM or use a smaller model",
}


class MemoryPlanError(ConfigError):
    """The predicted peak does not fit; str() is one line naming what to lower."""


class MemoryPlan(BaseModel):
    """Top-level terms describe the main training stage (sft, else ppo, else evaluate);
    `stages` has every present stage's terms and total."""
    device: str
    device_total_bytes: int | None
    device_free_bytes: int | None
    ram_free_bytes: int | None = None
    headroom: float = 1.0
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

    def table(self) -> str:
        """Human-readable, one term per line, in GiB (for `shomin plan` and plan.txt)."""
        def gib(n: int | None) -> str:
            return "unknown" if n is None else f"{n / GIB:9.3f} GiB"
        ram = "" if self.device == "cpu" else f", CPU RAM free {gib(self.ram_free_bytes).strip()}"
        lines = [f"memory plan on {self.device}: {self.num_parameters / 1e9:.3f} B parameters, "
                 f"{self.bytes_per_param:.4f} B per block Linear weight",
                 f"  device total {gib(self.device_total_bytes).strip()}, free {gib(self.device_free_bytes).strip()}, "
                 f"headroom {self.headroom:.0%}{ram}"]
        for stage, terms in self.stages.items():
            where = "CPU RAM" if stage == "merge" or self.device == "cpu" else self.device
            lines.append(f"{stage} ({where})")
            for term, n in terms.items():
                note = f"   {self.notes[f'{stage}.{term}']}" if f"{stage}.{term}" in self.notes else ""
                lines.append(f"  {term:<13}{gib(n)}{note}")
        verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown (free memory unknown)"}[self.fits]
        lines.append(f"peak: {self.peak_stage} {gib(self.peak_bytes).strip()} -> {verdict}")
        return "\n".join(lines) + "\n"


class EnvResult(StageResult):
    plan: MemoryPlan
    versions: dict[str, str]
    devices: list[dict]


# ---------------------------------------------------------------- model shape (no weights)


def _load_config(spec: ModelSpec, cache_dir: str | None):
    from transformers import AutoConfig
    check_source(spec)
    src, trust = spec.source, spec.trust_remote_code
    if src.startswith(EMBEDDED_PREFIX):
        name = src.removeprefix(EMBEDDED_PREFIX)
        converted = cache_root(ModelInitSettings(cache_dir=cache_dir)) / "embedded" / name
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(str(converted))
        package, gguf_file = EMBEDDED[name]  # GGUF metadata only: ~3 s, no tensors dequantized
        folder = importlib.util.find_spec(package).submodule_search_locations[0]
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if not is_hub_id(src):
        return AutoConfig.from_pretrained(str(Path(src).expanduser()), trust_remote_code=trust)
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(src, "config.json", revision=spec.revision,
                               cache_dir=str(cache_root(ModelInitSettings(cache_dir=cache_dir)) / "hub"))
    except Exception as e:  # offline, unknown or gated repo
        raise ConfigError(f"model.source: cannot fetch config.json of '{src}' from the hub ({type(e).__name__}); "
                          "check the id and network, or unset HF_HUB_OFFLINE") from None
    return AutoConfig.from_pretrained(str(Path(path).parent), trust_remote_code=trust)


def model_shape(spec: ModelSpec, cache_dir: str | None = None) -> dict:
    """Sizes the plan needs, from the config alone (see `shape_from_config`)."""
    return shape_from_config(_load_config(spec, cache_dir), spec.trust_remote_code)


def shape_from_config(config, trust_remote_code: bool = False) -> dict:
    """Build the model on the meta device and measure it. `linears` groups the Linear
    layers LoRA can adapt and bitsandbytes quantizes (all but the output layer) by name
    with the layer index as `*`: {name: [in, out, count]}."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights skips tying; without this tied heads count twice
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
    return sum(lora.r * (i + o) * n for name, (i, o, n) in shape["linears"].items() if _hit(name, lora.target_modules))


# ---------------------------------------------------------------- the arithmetic


def _weights(shape: dict, quantization: str, spec: ModelSpec, device: str) -> tuple[int, float, int]:
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


def _activations(b: int, s: int, shape: dict, dtype_bytes: int, checkpointing: bool, with_inputs: bool = True) -> int:
    """All layers' activations, or under checkpointing one layer's (+ every layer's saved input
    unless `with_inputs` is False: the SFT plan counts those as its own term)."""
    h, layers, k = shape["hidden_size"], shape["num_hidden_layers"], K_ACT * dtype_bytes / 2
    if checkpointing:
        return round(layers * dtype_bytes * s * b * h * with_inputs + k * s * b * h)
    return round(layers * k * s * b * h)


def _lora_dropout(b: int, s: int, shape: dict, lora: LoraSettings, dtype_bytes: int, checkpointing: bool) -> int:
    """LoRA with dropout > 0 keeps, per adapted layer, the dropped-out copy of its input
    (dtype B) and the mask (1 B) for backward: (dtype B + 1) x s x b x in_features.
    Measured on H100 (bench/plan_check.py), this is what a 34·s·b·h estimate misses.
    With checkpointing only the recomputed layer holds it."""
    if lora.dropout == 0:
        return 0
    per_model = sum(i * n for name, (i, o, n) in shape["linears"].items() if _hit(name, lora.target_modules))
    total = (dtype_bytes + 1) * s * b * per_model
    return round(total / shape["num_hidden_layers"]) if checkpointing else total


def _hit(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name.replace("*", "0")) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _logits(b: int, s: int, shape: dict, with_grad: bool = True, dtype_bytes: int = 4, chunked: bool = False) -> int:
    """fp32 logits (+ their gradient); a 16-bit model also keeps its own 16-bit logits
    (and their gradient) beside the fp32 upcast the loss makes. `chunked`: TRL's fused LM
    head, which holds at most 4096 tokens x 32768 vocab entries in fp32 at a time."""
    if chunked:
        return min(b * s, 4096) * min(shape["vocab_size"], 32768) * 4 * (2 if with_grad else 1)
    per = 4 + (dtype_bytes if dtype_bytes < 4 else 0)
    return b * s * shape["vocab_size"] * per * (2 if with_grad else 1)


def _kv_cache(b: int, s: int, shape: dict, dtype_bytes: int) -> int:
    return 2 * shape["num_hidden_layers"] * b * s * shape["kv_dim"] * dtype_bytes


def _sft_terms(sft, spec: ModelSpec, shape: dict, device: str, weights: int, act_b: int, notes: dict) -> dict:
    """See the module docstring; the SFT levers change three terms. frozen_dtype float32 (PEFT's
    k-bit preparation) stores the unquantized weights and the checkpointed residual stream in
    4 B; offload_checkpoints keeps the checkpoints in host memory; fused_lora under the
    stage's own checkpointing keeps one layer's dequantized weights through its backward."""
    b, s, n_lora, layers = sft.micro_batch_size, sft.max_seq_length, lora_params(shape, sft.lora), shape["num_hidden_layers"]
    ckpt = sft.gradient_checkpointing
    upcast = spec.quantization != "none" and sft.upcast_frozen(spec)
    if upcast:
        weights += (shape["num_parameters"] - shape["linear_params"]) * (4 - act_b)
    offload = ckpt and sft.offload_checkpoints and device == "cuda"
    resid_b = 4 if upcast else act_b
    own_ckpt = ckpt and (sft.fused_lora or sft.offload_checkpoints)
    layer_weights = act_b * shape["linear_params"] // layers if own_ckpt and sft.fused_lora else 0
    terms = {"weights": weights, "lora": 8 * n_lora, "optimizer": 8 * n_lora,
             "checkpoints": 0 if offload or not ckpt else layers * resid_b * s * b * shape["hidden_size"],
             "activations": _activations(b, s, shape, act_b, ckpt, with_inputs=False)
             + _lora_dropout(b, s, shape, sft.lora, act_b, ckpt) + layer_weights,
             "logits": _logits(b, s, shape, dtype_bytes=act_b, chunked=_chunked_lm_head())}
    # under checkpointing the LM head's backward and the layers' recompute come one after the other
    transient = max(terms["activations"], terms["logits"]) if ckpt else terms["activations"] + terms["logits"]
    terms["total"] = weights + 16 * n_lora + terms["checkpoints"] + transient
    notes["sft.lora"] = f"{n_lora:,} params x (4 B weight + 4 B grad)"
    notes["sft.activations"] = (f"b={b} s={s} checkpointing={ckpt}" + (", checkpoints offloaded" if offload else "")
                                + (", frozen weights float32" if upcast else ""))
    notes["sft.total"] = "weights + lora + optimizer + checkpoints + " + \
        ("max(activations, logits)" if ckpt else "activations + logits")
    return terms


def _chunked_lm_head() -> bool:
    """TRL >= 1.16 computes the SFT loss from the hidden states in chunks (never all the logits)."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("trl").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (1, 16)


def plan_memory(pipeline: Pipeline, shape: dict, device: str, free_bytes: int | None,
                total_bytes: int | None, *, headroom: float = 1.0, ram_free_bytes: int | None = None) -> MemoryPlan:
    """Predict each present heavy stage's peak on `device` (cpu or cuda). Merge lives in CPU
    RAM: on cuda it is checked against `ram_free_bytes`; on cpu RAM is the device."""
    st, spec = pipeline.stages, pipeline.model
    ram_free = free_bytes if device == "cpu" else ram_free_bytes
    stages: dict[str, dict[str, int]] = {}
    notes: dict[str, str] = {}
    weights, per, act_b = _weights(shape, spec.quantization, spec, device)
    notes["sft.weights"] = notes["evaluate.weights"] = f"{spec.quantization}: model.quantization"
    if st.sft:
        stages["sft"] = _sft_terms(st.sft, spec, shape, device, weights, act_b, notes)
    if st.merge:
        stages["merge"] = {"weights": shape["num_parameters"] * DTYPE_BYTES[st.merge.dtype]}
        notes["merge.weights"] = f"{st.merge.dtype}, CPU RAM"
    if st.ppo:
        ppo = st.ppo
        w, _, pb = _weights(shape, ppo.quantization, spec, device)
        n_lora, s = lora_params(shape, ppo.lora), ppo.query_max_tokens + ppo.response_max_tokens
        gen = _kv_cache(ppo.batch_size, s, shape, pb)
        act = _activations(ppo.mini_batch_size, s, shape, pb, False)  # PPO runs in eval mode: no LoRA dropout copies
        logits = _logits(ppo.mini_batch_size, s, shape, dtype_bytes=pb)
        stages["ppo"] = {"weights": w, "lora": 8 * n_lora, "optimizer": 8 * n_lora,
                         "value_head": 16 * (shape["hidden_size"] + 1), "generation": gen,
                         "activations": act, "logits": logits}
        # rollouts and updates alternate: only the larger phase counts
        stages["ppo"]["total"] = w + 16 * n_lora + 16 * (shape["hidden_size"] + 1) + max(gen, act + logits)
        notes["ppo.weights"] = f"{ppo.quantization}: stages.ppo.quantization"
        notes["ppo.lora"] = f"{n_lora:,} params x (4 B weight + 4 B grad)"
        notes["ppo.generation"] = f"batch={ppo.batch_size} s={s}"
        notes["ppo.total"] = "weights + lora + optimizer + value_head + max(generation, activations + logits)"
    if st.evaluate:
        ev = st.evaluate
        infer = round(K_ACT * act_b / 2 * ev.batch_size * ev.max_seq_length * shape["hidden_size"]) \
            + _logits(ev.batch_size, ev.max_seq_length, shape, with_grad=False)
        gen = _kv_cache(max(ev.num_prompts, 1), ev.max_seq_length + ev.max_new_tokens, shape, act_b)
        stages["evaluate"] = {"weights": weights, "forward": infer, "generation": gen, "total": weights + max(infer, gen)}
        notes["evaluate.forward"] = "one layer's activations + fp32 logits, no grad"
    for terms in stages.values():
        terms.setdefault("total", sum(terms.values()))
    peak_stage = max(stages, key=lambda k: stages[k]["total"], default="none")
    verdicts = [None if budget is None else stages[k]["total"] <= headroom * budget
                for k in stages for budget in [ram_free if k == "merge" else free_bytes]]
    fits = False if False in verdicts else (None if None in verdicts else True)
    main = stages.get("sft") or stages.get("ppo") or stages.get("evaluate") or {"weights": weights}
    return MemoryPlan(
        device=device, device_total_bytes=total_bytes, device_free_bytes=free_bytes, ram_free_bytes=ram_free,
        headroom=headroom, num_parameters=shape["num_parameters"], bytes_per_param=per, weights_bytes=main["weights"],
        lora_params=main.get("lora", 0) // 8, lora_bytes=main.get("lora", 0), optimizer_bytes=main.get("optimizer", 0),
        activation_bytes=main.get("activations", main.get("forward", 0)), logits_bytes=main.get("logits", 0),
        generation_bytes=stages.get("ppo", {}).get("generation", 0),
        peak_bytes=stages[peak_stage]["total"] if stages else 0, peak_stage=peak_stage, fits=fits,
        stages=stages, notes=notes)


# ---------------------------------------------------------------- environment


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)  # reads metadata; never imports (bnb can crash on import)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _ram() -> tuple[int | None, int | None]:
    """(total, available) bytes; /proc/meminfo shows the host, so a cgroup v2 limit caps it."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        total, avail = vm.total, vm.available
    except ImportError:
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            total, avail = (int(info[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
        except (OSError, KeyError, ValueError):
            return None, None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            total, avail = min(total, int(limit)), min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return total, avail


def environment() -> dict:
    """Versions and devices with total/free memory. Never raises: missing CUDA or
    bitsandbytes are reported, not fatal (env_check must run everywhere)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    versions.update({p: _version(p) for p in ("transformers", "peft", "trl", "bitsandbytes", "accelerate")})
    devices: list[dict] = []
    try:
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"type": "cuda", "index": i, "name": torch.cuda.get_device_name(i),
                            "total_bytes": total, "free_bytes": free})
    except Exception as e:  # broken driver: report, let the plan say "unknown"
        devices.append({"type": "cuda", "error": f"{type(e).__name__}: {e}"})
    total, free = _ram()
    devices.append({"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "total_bytes": total, "free_bytes": free})
    return {"versions": versions, "devices": devices, "platform": platform.platform(), "executable": sys.executable}


def plan_for(pipeline: Pipeline, settings: EnvCheckSettings | None = None) -> MemoryPlan:
    """The plan on this machine, without enforcing it (`shomin plan`). A cuda pipeline
    previewed on a machine without CUDA still gets a plan, with fit unknown."""
    return _plan(pipeline, settings or pipeline.stages.env_check or EnvCheckSettings())[0]


def _plan(pipeline: Pipeline, settings: EnvCheckSettings) -> tuple[MemoryPlan, dict, dict]:
    env = environment()
    device = "cuda" if pipeline.device == "cuda" else resolve_device(pipeline.device)
    cache_dir = pipeline.stages.model_init.cache_dir if pipeline.stages.model_init else None
    shape = model_shape(pipeline.model, cache_dir)
    cpu = next(d for d in env["devices"] if d["type"] == "cpu")
    dev = cpu if device == "cpu" else next((d for d in env["devices"] if d.get("index") == 0), {})
    plan = plan_memory(pipeline, shape, device, dev.get("free_bytes"), dev.get("total_bytes"),
                       headroom=settings.headroom, ram_free_bytes=cpu["free_bytes"])
    return plan, env, shape


def run(settings: EnvCheckSettings, pipeline: Pipeline, out_dir: str | Path) -> EnvResult:
    t0 = time.time()
    device = resolve_device(pipeline.device)  # cuda asked for but absent: fail here
    ppo_q = pipeline.stages.ppo.quantization if pipeline.stages.ppo else "none"
    if device == "cpu" and "8bit" in (pipeline.model.quantization, ppo_q):
        raise ConfigError("quantization: 8bit needs a CUDA GPU; use 4bit or none on CPU")
    plan, env, shape = _plan(pipeline, settings)
    if settings.enforce_memory_plan and plan.fits is False:
        raise MemoryPlanError(_failure(plan))
    with staged_dir(out_dir) as tmp:
        write_json(tmp / "env.json", {**env, "model_shape": shape, "plan": plan.model_dump()})
        write_text(tmp / "plan.txt", plan.table())
    out = Path(out_dir)
    metrics = {"peak_gib": plan.peak_bytes / GIB, "num_parameters": float(plan.num_parameters)}
    if plan.device_free_bytes is not None:
        metrics["device_free_gib"] = plan.device_free_bytes / GIB
    return EnvResult(stage="env_check", output_dir=str(out), plan=plan, versions=env["versions"],
                     devices=env["devices"], metrics=metrics, seconds=time.time() - t0,
                     artifacts={"env": str(out / "env.json"), "plan": str(out / "plan.txt")})


def _failure(plan: MemoryPlan) -> str:
    """One line for the worst stage: its peak, the budget it was held to, what to lower."""
    def budget(stage: str) -> int | None:
        return plan.ram_free_bytes if stage == "merge" else plan.device_free_bytes
    over = [k for k in plan.stages if budget(k) is not None and plan.stages[k]["total"] > plan.headroom * budget(k)]
    worst = max(over, key=lambda k: plan.stages[k]["total"] / max(budget(k), 1))
    where = "CPU RAM" if worst == "merge" or plan.device == "cpu" else plan.device
    return (f"env_check: predicted {worst} peak {plan.stages[worst]['total'] / GIB:.2f} GiB exceeds "
            f"{plan.headroom:.0%} of {budget(worst) / GIB:.2f} GiB free {where}; {HINTS[worst]} "
            "(or set stages.env_check.enforce_memory_plan: false)")
