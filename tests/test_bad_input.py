"""Bad input is refused before any work starts, through the real command line.

One case per mistake: `shomin run` (or `validate`) exits 2, prints exactly one line
on stderr that names the file and the field path (or the data file's line/row),
no traceback, and leaves nothing behind (no runs/ folder at all).
Field-level details are unit-tested in test_config.py / test_data.py; this file is
the end-to-end proof that each of them reaches the user as one clean line.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT

DOLLY = ROOT / "data" / "dolly-ja-sample.jsonl"


def base(model, data=DOLLY, **stages) -> dict:
    return {"pipelines": {"p": {
        "model": {"source": str(model)},
        "dataset": {"source": str(data)},
        "stages": {"model_init": None, "dataset": None,
                   "sft": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4}, **stages},
    }}}


def with_(cfg: dict, path: str, value) -> dict:
    """Set pipelines.p.<path> (dotted) in a copy of cfg."""
    cfg = json.loads(json.dumps(cfg))
    node = cfg["pipelines"]["p"]
    *parents, last = path.split(".")
    for k in parents:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
    node[last] = value
    return cfg


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False)   # stage order matters


def rows_file(tmp_path, rows, name="rows.jsonl", raw: bytes | None = None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD_ROWS = [{"instruction": f"質問{i}", "input": "", "output": f"答え{i}"} for i in range(10)]
RLHF = {"merge": None, "ppo": {"steps": 1, "batch_size": 2, "mini_batch_size": 2}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model):
    """A classifier whose labels lack POSITIVE, and a model folder holding only pytorch_model.bin."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForSequenceClassification
    root = tmp_path_factory.mktemp("assets")
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels, config.id2label = 2, {0: "NEGATIVE", 1: "NEUTRAL"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    LlamaForSequenceClassification(config).save_pretrained(root / "classifier")
    pickle_only = root / "pickle-only"
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    lm.config.save_pretrained(pickle_only)   # a pickle checkpoint as older tools wrote it
    torch.save(lm.state_dict(), pickle_only / "pytorch_model.bin")
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, pickle_only)
    assert not list(pickle_only.glob("*.safetensors")) and list(pickle_only.glob("*.bin"))
    return {"classifier": root / "classifier", "pickle_only": pickle_only}


# Each case: (tmp_path, model, assets) -> (cli args after `run -f CFG` is built, config or raw bytes), and the
# substrings the one line must contain. "{cfg}" / "{data}" in expectations stand for those file paths.
CASES = {
    # ---- the file itself
    "not-yaml": (lambda t, m, a: (b"pipelines: [a, b\n", []), ["{cfg}", "line 2"]),
    "not-utf8-yaml": (lambda t, m, a: (b"pipelines:\n  p\xff: 1\n", []), ["{cfg}", "not UTF-8"]),
    "not-a-mapping": (lambda t, m, a: (b"- just\n- a list\n", []), ["{cfg}", "top-level `pipelines:`"]),
    "empty-file": (lambda t, m, a: (b"   \n", []), ["{cfg}", "file is empty"]),
    "config-missing": (lambda t, m, a: (None, []), ["{cfg}", "file not found"]),
    "duplicate-keys": (lambda t, m, a: (
        f"pipelines:\n  p:\n    model: {{source: {m}}}\n    model: {{source: {m}}}\n    stages: {{model_init: }}\n".encode(), []),
        ["{cfg}", "line 4", "duplicate key 'model' (first on line 3)"]),
    # ---- unknown keys, at every level
    "unknown-key-top": (lambda t, m, a: ({**base(m), "pipeline": {}}, []), ["{cfg}", "pipeline: unknown key"]),
    "unknown-key-pipeline": (lambda t, m, a: (with_(base(m), "colour", "red"), []), ["{cfg}", "pipelines.p.colour: unknown key"]),
    "unknown-key-stage": (lambda t, m, a: (with_(base(m), "stages.sft.lerning_rate", 1), []),
                          ["{cfg}", "pipelines.p.stages.sft.lerning_rate: unknown key"]),
    "unknown-key-nested": (lambda t, m, a: (with_(base(m), "stages.sft.lora.rank", 8), []),
                           ["{cfg}", "pipelines.p.stages.sft.lora.rank: unknown key"]),
    # ---- types and ranges
    "wrong-type": (lambda t, m, a: (with_(base(m), "stages.sft.learning_rate", "fast"), []),
                   ["{cfg}", "pipelines.p.stages.sft.learning_rate", "valid number"]),
    "lr-zero": (lambda t, m, a: (with_(base(m), "stages.sft.learning_rate", 0), []),
                ["{cfg}", "pipelines.p.stages.sft.learning_rate", "greater than 0"]),
    "lr-negative": (lambda t, m, a: (with_(base(m), "stages.sft.learning_rate", -1e-4), []),
                    ["{cfg}", "pipelines.p.stages.sft.learning_rate", "greater than 0"]),
    "lora-rank-zero": (lambda t, m, a: (with_(base(m), "stages.sft.lora.r", 0), []), ["{cfg}", "pipelines.p.stages.sft.lora.r", "greater than 0"]),
    "dropout-one": (lambda t, m, a: (with_(base(m), "stages.sft.lora.dropout", 1.0), []), ["{cfg}", "pipelines.p.stages.sft.lora.dropout", "less than 1"]),
    "dropout-negative": (lambda t, m, a: (with_(base(m), "stages.sft.lora.dropout", -0.1), []),
                         ["{cfg}", "pipelines.p.stages.sft.lora.dropout", "greater than or equal to 0"]),
    "negative-steps": (lambda t, m, a: (with_(base(m), "stages.sft.max_steps", -5), []), ["{cfg}", "pipelines.p.stages.sft.max_steps"]),
    "ppo-zero-steps": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.steps", 0), []), ["{cfg}", "pipelines.p.stages.ppo.steps"]),
    # ---- stages
    "unknown-stage": (lambda t, m, a: (with_(base(m), "stages.finetune", None), []), ["{cfg}", "pipelines.p.stages.finetune: unknown key"]),
    "merge-without-sft": (lambda t, m, a: ({"pipelines": {"p": {"model": {"source": str(m)}, "dataset": {"source": str(DOLLY)},
                                            "stages": {"model_init": None, "dataset": None, "merge": None}}}}, []),
                          ["{cfg}", "stage 'merge' needs stage 'sft'"]),
    "ppo-without-merge": (lambda t, m, a: (base(m, ppo=None), []), ["{cfg}", "stage 'ppo' needs stage 'merge'"]),
    "stages-out-of-order": (lambda t, m, a: ({"pipelines": {"p": {"model": {"source": str(m)}, "dataset": {"source": str(DOLLY)},
                                              "stages": {"model_init": None, "sft": None, "dataset": None}}}}, []),
                            ["{cfg}", "pipelines.p.stages", "order"]),
    "reward-kind-unknown": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.reward", {"kind": "magic"}), []),
                            ["{cfg}", "pipelines.p.stages.ppo.reward.kind"]),
    "reward-function-missing": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.reward", {"kind": "function"}), []),
                                ["{cfg}", "pipelines.p.stages.ppo.reward", "requires `function`"]),
    "reward-module-unknown": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.reward", {"kind": "function", "function": "no_such_reward_mod:score"}), []),
                              ["{cfg}", "pipelines.p.stages.ppo.reward.function", "module 'no_such_reward_mod' not found"]),
    "reward-label-missing": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.reward", {"kind": "hf-classifier", "model": str(a["classifier"])}), []),
                             ["{cfg}", "pipelines.p.stages.ppo.reward.positive_label", "'POSITIVE' is not a label", "NEUTRAL"]),
    "reward-model-not-cached-offline": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.reward", {"kind": "hf-classifier", "model": "shomin-test/no-such-classifier"}), []),
                                        ["{cfg}", "pipelines.p.stages.ppo.reward.model", "HF_HUB_OFFLINE"]),
    # ---- the command line
    "unknown-pipeline": (lambda t, m, a: (base(m), ["--pipeline", "q"]), ["{cfg}", "no pipeline named 'q'", "known: p"]),
    "set-unknown-path": (lambda t, m, a: (base(m), ["--set", "stages.sft.lerning_rate=1"]), ["--set", "pipelines.p.stages.sft.lerning_rate: unknown key"]),
    "set-absent-stage": (lambda t, m, a: (base(m), ["--set", "stages.ppo.steps=3"]), ["--set", "stages.ppo.steps", "stage 'ppo' is not in this pipeline"]),
    "set-wrong-type": (lambda t, m, a: (base(m), ["--set", "stages.sft.max_steps=many"]), ["--set", "pipelines.p.stages.sft.max_steps", "valid integer"]),
    "set-no-equals": (lambda t, m, a: (base(m), ["--set", "stages.sft.max_steps"]), ["--set", "expected KEY.PATH=VALUE"]),
    # ---- datasets
    "data-missing-file": (lambda t, m, a: (base(m, t / "none.jsonl"), []), ["{data}", "file not found", "dataset.source"]),
    "data-wrong-suffix": (lambda t, m, a: (base(m, rows_file(t, GOOD_ROWS, "rows.txt")), []), ["{data}", "expected one of"]),
    "data-not-utf8": (lambda t, m, a: (base(m, rows_file(t, None, raw=b'{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "\xff\xfe"}\n')), []),
                      ["{data}", "line 2", "not UTF-8"]),
    "data-malformed-jsonl": (lambda t, m, a: (base(m, rows_file(t, None, raw=b'{"instruction": "a", "input": "", "output": "b"}\n\n{"instruction": "a",\n')), []),
                             ["{data}", "line 3", "malformed JSON"]),
    "data-not-object": (lambda t, m, a: (base(m, rows_file(t, None, raw=b'{"instruction": "a", "input": "", "output": "b"}\n[1, 2]\n')), []),
                        ["{data}", "line 2", "expected a JSON object"]),
    "data-missing-column": (lambda t, m, a: (base(m, rows_file(t, [{"instruction": "a", "input": ""}] * 3)), []),
                            ["{data}", "missing column 'output'"]),
    "data-extra-column": (lambda t, m, a: (base(m, rows_file(t, [dict(r, category="qa") for r in GOOD_ROWS])), []),
                          ["{data}", "unexpected column 'category'"]),
    "data-empty-instruction": (lambda t, m, a: (base(m, rows_file(t, GOOD_ROWS[:3] + [{"instruction": "", "input": "", "output": "x"}])), []),
                               ["{data}", "row 4: column 'instruction': empty or whitespace-only"]),
    "data-whitespace-output": (lambda t, m, a: (base(m, rows_file(t, GOOD_ROWS[:1] + [{"instruction": "q", "input": "", "output": " \n\t"}])), []),
                               ["{data}", "row 2: column 'output': empty or whitespace-only"]),
    "data-null-output": (lambda t, m, a: (base(m, rows_file(t, GOOD_ROWS[:1] + [{"instruction": "q", "input": "", "output": None}])), []),
                         ["{data}", "row 2: column 'output'"]),
    "data-empty": (lambda t, m, a: (base(m, rows_file(t, [])), []), ["{data}", "dataset is empty"]),
    "data-eval-split-leaves-nothing": (lambda t, m, a: (base(m, rows_file(t, GOOD_ROWS[:1])), []),
                                       ["{data}", "1 rows leave nothing to train on", "eval_fraction"]),
    "data-hub-not-cached-offline": (lambda t, m, a: (base(m, "shomin-test/no-such-dataset"), []),
                                    ["dataset.source", "shomin-test/no-such-dataset", "HF_HUB_OFFLINE"]),
    # ---- models
    "model-local-missing": (lambda t, m, a: (base(t / "no-such-model"), []), ["{cfg}", "pipelines.p.model.source", "neither a local folder nor a hub id"]),
    "model-folder-without-config": (lambda t, m, a: (base(t), []), ["{cfg}", "pipelines.p.model.source", "has no config.json"]),
    "model-pickle-only": (lambda t, m, a: (base(a["pickle_only"]), []),
                          ["{cfg}", "pipelines.p.model.source", "no .safetensors weights", "pytorch_model.bin"]),
    "model-hub-not-cached-offline": (lambda t, m, a: (base("shomin-test/not-cached-model"), []),
                                     ["{cfg}", "pipelines.p.model.source", "'shomin-test/not-cached-model' is not in the local cache", "HF_HUB_OFFLINE=1"]),
    "model-embedded-unknown": (lambda t, m, a: (base("embedded:gpt-5"), []), ["{cfg}", "pipelines.p.model.source", "unknown embedded model"]),
    "model-8bit-on-cpu": (lambda t, m, a: (with_(base(m), "model.quantization", "8bit"), []),
                          ["{cfg}", "pipelines.p.model.quantization", "8bit needs a CUDA GPU"]),
    "ppo-8bit-on-cpu": (lambda t, m, a: (with_(base(m, **RLHF), "stages.ppo.quantization", "8bit"), []),
                        ["{cfg}", "pipelines.p.stages.ppo.quantization", "8bit needs a CUDA GPU"]),
    "device-cuda-absent": (lambda t, m, a: (with_(base(m), "device", "cuda"), []), ["{cfg}", "pipelines.p.device", "no CUDA device"]),
    "liger-on-cpu": (lambda t, m, a: (with_(base(m), "stages.sft.kernels", "liger"), []),
                     ["{cfg}", "pipelines.p.stages.sft.kernels", "liger needs CUDA"]),
    # a tracking server that is not there (port 9, discard: nothing listens on loopback)
    "mlflow-server-away": (lambda t, m, a: (with_(base(m), "tracking.uri", "http://127.0.0.1:9"), []),
                           ["{cfg}", "pipelines.p.tracking.uri", "MLflow at http://127.0.0.1:9 does not answer"]),
}


def shomin(args, cwd, timeout=90):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "shomin.flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r, time.time() - t0


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_line(case, tmp_path, tiny_model, assets):
    make, expected = CASES[case]
    cfg_body, extra = make(tmp_path, tiny_model, assets)
    cfg = tmp_path / "pipelines.yaml"
    if isinstance(cfg_body, bytes):
        cfg.write_bytes(cfg_body)
    elif cfg_body is not None:
        cfg.write_text(dump(cfg_body), encoding="utf-8")
    pipeline = "p"
    if extra[:1] == ["--pipeline"]:
        pipeline, extra = extra[1], extra[2:]
    data = str(cfg_body["pipelines"]["p"]["dataset"]["source"]) if isinstance(cfg_body, dict) else ""
    r, seconds = shomin(["run", "-f", str(cfg), pipeline, *extra], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("shomin: "), r.stderr[-2000:]
    for want in expected:
        want = want.replace("{cfg}", str(cfg)).replace("{data}", data)
        assert want in lines[0], f"{want!r} not in {lines[0]!r}"
    assert "Traceback" not in r.stderr
    assert seconds < 30, f"refusing took {seconds:.1f}s"   # no retry loops, no model loads
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_validate_refuses_the_same_way_and_passes_a_good_file(tmp_path, tiny_model):
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(dump(base(tiny_model)), encoding="utf-8")
    ok, _ = shomin(["validate", str(cfg)], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr   # the control: the base config of every case above is valid
    cfg.write_text(dump(with_(base(tiny_model), "stages.sft.lora.dropout", 1.5)), encoding="utf-8")
    bad, _ = shomin(["validate", str(cfg)], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert f"{cfg}: pipelines.p.stages.sft.lora.dropout" in bad.stderr
    assert not (tmp_path / "runs").exists()
