"""pipelines.yaml parsing: typed, strict, errors name the field path."""
import subprocess
import sys
import textwrap

import pytest
import yaml
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.registry import load_config, load_pipeline
from shomin.tasks.stages.sft import SftSettings

from tests.conftest import ROOT

MINIMAL = """
pipelines:
  p:
    model: {source: embedded:smollm2-135m-instruct}
    dataset: {source: data/dolly-ja-sample.jsonl}
    stages:
      model_init:
      dataset:
      sft: {max_steps: 2}
"""


def write(tmp_path, text, name="pipelines.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_shipped_pipelines_parse_with_their_seed_settings():
    config = load_config(ROOT / "pipelines.yaml")
    assert set(config) >= {"dolly-ja-lora", "bloom-qlora", "imdb-rlhf", "dolly-ja-local", "imdb-rlhf-local"}
    dolly = config["dolly-ja-lora"]
    assert (dolly.stages.sft.lora.r, dolly.stages.sft.lora.alpha, dolly.stages.sft.learning_rate) == (8, 16, 3e-4)
    assert (dolly.stages.sft.epochs, dolly.stages.sft.batch_size) == (3, 32)
    bloom = config["bloom-qlora"]
    assert (bloom.model.quantization, bloom.model.bnb_4bit_quant_type, bloom.model.compute_dtype) == ("4bit", "nf4", "bfloat16")
    assert bloom.stages.sft.lora.target_modules == ["query_key_value"] and bloom.stages.sft.lora.dropout == 0.05
    rlhf = config["imdb-rlhf"]
    assert rlhf.stages.names() == ["env_check", "model_init", "dataset", "sft", "merge", "ppo", "evaluate"]
    assert rlhf.model.quantization == "8bit" and rlhf.stages.merge.dtype == "float16"
    assert rlhf.stages.ppo.reward.model == "lvwerra/distilbert-imdb"
    assert config["imdb-rlhf-local"].stages.ppo.reward.kind == "vader"
    assert all(not p.model.trust_remote_code for p in config.values())


@pytest.mark.parametrize("patch, expected", [
    (("sft: {max_steps: 2}", "sft: {max_steps: 2, lerning_rate: 1}"), "pipelines.p.stages.sft.lerning_rate: unknown key"),
    (("sft: {max_steps: 2}", "sft: {learning_rate: fast}"), "pipelines.p.stages.sft.learning_rate"),
    (("sft: {max_steps: 2}", "sft: {learning_rate: 0}"), "greater than 0"),
    (("sft: {max_steps: 2}", "sft: {lora: {r: 0}}"), "pipelines.p.stages.sft.lora.r"),
    (("sft: {max_steps: 2}", "sft: {lora: {dropout: 1.0}}"), "pipelines.p.stages.sft.lora.dropout"),
    (("sft: {max_steps: 2}", "sft: {max_steps: -5}"), "pipelines.p.stages.sft.max_steps"),
    (("sft: {max_steps: 2}", "sft: {batch_size: 6, micro_batch_size: 4}"), "multiple of micro_batch_size"),
    (("      sft: {max_steps: 2}", "      merge:\n      sft: {}"), "order"),
    (("      sft: {max_steps: 2}", "      merge:"), "stage 'merge' needs stage 'sft'"),
    (("      sft: {max_steps: 2}", "      sft: {}\n      merge:\n      ppo: {reward: {kind: magic}}"), "pipelines.p.stages.ppo.reward.kind"),
    (("      sft: {max_steps: 2}", "      sft: {}\n      ppo:"), "stage 'ppo' needs stage 'merge'"),
    (("      sft: {max_steps: 2}", "      sft: {}\n      finetune:"), "pipelines.p.stages.finetune: unknown key"),
    (("model: {source", "model: {quantization: 3bit, source"), "pipelines.p.model.quantization"),
])
def test_bad_settings_name_the_field(tmp_path, patch, expected):
    path = write(tmp_path, MINIMAL.replace(*patch))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expected in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("pipelines: [a, b", "line"),
    ("", "empty"),
    ("- just\n- a list\n", "top-level `pipelines:`"),
    ("pipelines:\n  p: {model: {source: x/y}, stages: {model_init: }}\n  p: {}\n", "duplicate key 'p'"),
    ("pipelines:\n  p: {model: {source: x/y}, stages: {model_init: }}\nextra: 1\n", "extra: unknown key"),
])
def test_broken_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(path)


def test_not_utf8_and_missing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"pipelines:\n  p\xff\xfe: 1\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, MINIMAL)
    p = load_pipeline(path, "p", ["stages.sft.learning_rate=1e-4", "stages.sft.lora.target_modules=[q_proj, v_proj]", "seed=7"])
    assert p.stages.sft.learning_rate == 1e-4 and p.seed == 7
    assert p.stages.sft.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="stages.sft.lerning_rate: unknown key"):
        load_pipeline(path, "p", ["stages.sft.lerning_rate=1"])
    with pytest.raises(ConfigError, match="stages.sft.max_steps"):
        load_pipeline(path, "p", ["stages.sft.max_steps=many"])
    with pytest.raises(ConfigError, match="stage 'ppo' is not in this pipeline"):
        load_pipeline(path, "p", ["stages.ppo.steps=3"])
    with pytest.raises(ConfigError, match="no pipeline named 'q'"):
        load_pipeline(path, "q")


def test_settings_defaults_are_documented():
    missing = [n for n, f in SftSettings.model_fields.items() if not f.description and n not in
               ("weight_decay", "logging_steps", "lora")]
    assert missing == []


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "shomin.flows.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_validate_ok_and_bad_file_exit_2(tmp_path):
    ok = _cli("validate", str(ROOT / "pipelines.yaml"))
    assert ok.returncode == 0, ok.stderr
    shipped = yaml.safe_load((ROOT / "pipelines.yaml").read_text(encoding="utf-8"))["pipelines"]
    assert f"{len(shipped)} pipelines valid ({', '.join(shipped)})" in ok.stdout
    bad = write(tmp_path, MINIMAL.replace("max_steps: 2", "max_steps: 2, bogus: 1"))
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "pipelines.p.stages.sft.bogus: unknown key" in r.stderr


def test_cli_bad_dataset_row_exit_2_before_any_model(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "input": "", "output": "b"}\n'
                    '{"instruction": "c", "input": "", "output": "   "}\n', encoding="utf-8")
    cfg = write(tmp_path, MINIMAL.replace("data/dolly-ja-sample.jsonl", str(rows)).replace(
        "embedded:smollm2-135m-instruct", str(tmp_path / "no-model-here")))
    r = _cli("run", "-f", str(cfg), "p", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    # the model path is checked first, so fix it to reach the data check
    cfg2 = write(tmp_path, MINIMAL.replace("data/dolly-ja-sample.jsonl", str(rows)), "p2.yaml")
    r = _cli("run", "-f", str(cfg2), "p", cwd=tmp_path)
    assert r.returncode == 2
    assert "row 2: column 'output': empty or whitespace-only" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stages,dataset,field", [
    ("ppo: {lora: {dropout: 0.05}}", "", "lora.dropout"),                      # PPO's policy stays in eval mode
    ("ppo: {reward: {kind: vader, positive_label: POS}}", "", "positive_label"),  # a classifier-only field
    ("", ", format: text, template: {response: '{output}'}", "template"),       # text rows are not templated
    ("", ", format: instruction, text_column: body", "text_column"),
])
def test_a_setting_that_would_do_nothing_is_refused(tmp_path, stages, dataset, field):
    body = (f"pipelines:\n  p:\n    model: {{source: x/y}}\n    dataset: {{source: d.jsonl{dataset}}}\n"
            f"    stages:\n      model_init:\n      dataset:\n      sft:\n      merge:\n"
            + (f"      {stages}\n" if stages else ""))
    with pytest.raises(ConfigError, match=field) as err:
        load_pipeline(write(tmp_path, body), "p")
    assert "\n" not in str(err.value)
