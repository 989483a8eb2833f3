"""PPO stage on the tiny random Llama: reference model, learning, outputs, resume, evaluation."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from shomin.tasks import registry
from shomin.tasks.ground.errors import TrainingDiverged
from shomin.tasks.ground.records import DataResult, MergeResult
from shomin.tasks.ground.settings import LoraSettings, ModelSpec, RewardSettings
from shomin.tasks.models import rl
from shomin.tasks.models.loading import load_causal_lm, lora_config
from shomin.tasks.models.ppo_math import entropy_from_logits, masked_mean
from shomin.tasks.stages import ppo
from shomin.tasks.stages.ppo import PpoSettings

from tests.helpers import run_stage, sharpened, stage_context  # noqa: F401

TESTS = Path(__file__).resolve().parent
QUERIES = ["The movie was", "I watched it", "A quiet film", "The story"]


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # tests/ppo_rewards.py


def inputs(tmp_path: Path, model: Path, rows: list[dict]) -> tuple[MergeResult, DataResult]:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    merge = MergeResult(stage="merge", output_dir=str(model.parent), merged_path=str(model))
    data = DataResult(stage="dataset", output_dir=str(tmp_path), train_path=str(train), eval_path=str(train),
                      format="instruction" if "prompt" in rows[0] else "text", n_train=len(rows), n_eval=len(rows))
    return merge, data


def settings(**kw) -> PpoSettings:
    base = dict(reward=RewardSettings(kind="function", function="ppo_rewards:letters"), steps=2, batch_size=4,
                mini_batch_size=2, ppo_epochs=2, learning_rate=5e-3, response_min_tokens=4, response_max_tokens=6,
                init_kl_coef=0.05, target_kl=None, lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    return PpoSettings(**{**base, **kw})


def test_response_mask_stops_after_first_eos():
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask = rl.response_mask(response, torch.tensor([2]))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_reference_is_the_merged_model_and_kl_starts_at_zero(tiny_model):
    s, spec = settings(), ModelSpec(source=str(tiny_model))
    tok = ppo.load_tokenizer(tiny_model)
    tok.padding_side = "left"
    torch.manual_seed(0)
    policy = ppo.build_policy(s, spec, str(tiny_model), "cpu")
    batch = rl.rollout(policy, tok, QUERIES, s, 6, rl.eos_token_ids(tok, policy.lm, "cpu"))
    assert batch["query_mask"][:, 0].tolist() != [1] * len(QUERIES)  # really left padded

    with torch.no_grad(), policy.lm.disable_adapter():
        ref_logprobs, _, _ = rl.forward(policy, batch)
    plain = rl.PolicyWithValue(load_causal_lm(tiny_model, spec, "cpu"), value_head=False).eval()
    with torch.no_grad():
        plain_logprobs, _, _ = rl.forward(plain, batch)
    torch.testing.assert_close(ref_logprobs, plain_logprobs, rtol=0, atol=1e-6)

    kl, entropy = ppo.advantages(policy, batch, torch.zeros(len(QUERIES)), s, kl_coef=0.2)
    assert kl.tolist() == [0.0] * len(QUERIES)  # fresh LoRA (B = 0): policy == reference exactly
    assert torch.equal(batch["logprobs"], ref_logprobs)
    assert math.isfinite(entropy.item())


def trained_policy(tiny_model, s: PpoSettings):
    """A policy whose LoRA is no longer zero (as after some PPO steps), and a left-padded rollout."""
    tok = ppo.load_tokenizer(tiny_model)
    tok.padding_side = "left"
    torch.manual_seed(0)
    policy = ppo.build_policy(s, ModelSpec(source=str(tiny_model)), str(tiny_model), "cpu")
    with torch.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = rl.rollout(policy, tok, QUERIES, s, 6, rl.eos_token_ids(tok, policy.lm, "cpu"))
    return policy, batch


def test_one_pass_gives_the_policy_and_the_adapter_disabled_reference(tiny_model):
    policy, batch = trained_policy(tiny_model, settings())
    logprobs, values, entropy, ref_logprobs = rl.with_reference(policy, batch, rows=3)
    with torch.no_grad():
        expected, expected_values, logits = rl.forward(policy, batch)
        with policy.lm.disable_adapter():
            expected_ref, _, _ = rl.forward(policy, batch)
    assert (expected - expected_ref).abs().max() > 1e-3   # the adapter really changes the policy
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_logprobs, expected_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-5)
    mask = batch["response_mask"].float()
    torch.testing.assert_close(masked_mean(entropy, mask), entropy_from_logits(logits, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampling", [dict(top_k=0, top_p=1.0, temperature=1.0),
                                      dict(top_k=5, top_p=0.9, temperature=0.7)])
def test_the_static_cache_loop_samples_what_generate_samples(tiny_model, tmp_path, sampling):
    """The loop a CUDA graph replays (levers/static_decode.py), run op by op: for the same random
    numbers it draws generate()'s tokens, through left padding, the adapter, and rows that end at EOS."""
    from shomin.tasks.models.levers import static_decode
    model = sharpened(tiny_model, tmp_path / "sharp")   # peaked: the tokens depend on the logits
    policy, _ = trained_policy(model, settings())
    lm, tok = policy.lm, ppo.load_tokenizer(model)
    tok.padding_side = "left"
    enc = tok(QUERIES, return_tensors="pt", padding=True)
    prompt = enc.input_ids.shape[1]

    def both(eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        expected = lm.generate(**enc, do_sample=True, max_new_tokens=8, min_new_tokens=0, eos_token_id=eos,
                               pad_token_id=tok.pad_token_id, **sampling)[:, prompt:]
        torch.manual_seed(7)
        got = static_decode.sample(lm, enc.input_ids, enc.attention_mask, 8, pad_token_id=tok.pad_token_id,
                                   eos_ids=torch.tensor(eos), graphed=False, **sampling)
        return got, expected

    got, expected = both([tok.eos_token_id])
    assert torch.equal(got, expected)
    # A token the first row drew midway becomes the EOS: that row must end there and be padded after.
    stop = int(expected[0, 2])
    got, expected = both([stop])
    assert torch.equal(got, expected)
    assert (got[0, 3:] == tok.pad_token_id).all() and got.shape[1] > 3


def test_the_value_head_reads_the_last_normed_layer_without_keeping_every_layers_output(tiny_model):
    """Values come from the LM head's input at the kept positions: the same numbers as the last of
    all hidden states, without asking the model to keep every layer's output."""
    policy, batch = trained_policy(tiny_model, settings())
    asked = []
    policy.lm.register_forward_pre_hook(lambda m, a, kw: asked.append(kw.get("output_hidden_states")), with_kwargs=True)
    with torch.no_grad():
        policy.v_head.weight.normal_()
        _, values, _ = rl.forward(policy, batch)
        ids, attn = rl.sequences(batch)
        hidden = policy.lm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp_min(0),
                           output_hidden_states=True).hidden_states[-1]
    start = batch["query"].shape[1] - 1
    expected = policy.v_head(hidden[:, start:-1].float()).squeeze(-1)
    assert values.abs().max() > 1e-3
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)
    assert not asked[0]


def test_gradient_checkpointing_in_eval_recomputes_and_keeps_the_gradients(tiny_model):
    """The update under checkpointing (whole layers, or `selective`: each post-attention norm + MLP
    and the attention) keeps less for the backward pass and gets the same gradients; under
    `selective` nothing of the MLPs' intermediate width is kept, and the attention keeps nothing
    beyond what the MLPs alone would. Rollouts outside it keep their KV cache (the layers are out
    of training mode again) and the plain attention."""
    from shomin.tasks.models.levers import selective_checkpoint
    from shomin.tasks.models.loading import checkpointed_in_eval
    grads, saved, widths = {}, {}, {}
    for mode in (False, True, "mlp only", "selective"):
        policy, batch = trained_policy(tiny_model, settings(gradient_checkpointing=mode if mode != "mlp only" else "selective"))
        attention = policy.lm.config._attn_implementation
        stored = []
        with checkpointed_in_eval(policy.lm, mode is True), torch.autograd.graph.saved_tensors_hooks(
                lambda t: stored.append(t) or t, lambda t: t), (
                selective_checkpoint.recomputed_attention(policy.lm) if mode == "selective" else contextlib.nullcontext()):
            logprobs, values, _ = rl.forward(policy, batch)
        (logprobs.sum() + values.sum()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        saved[mode] = sum(t.numel() for t in stored)
        widths[mode] = {t.shape[-1] for t in stored if t.dim()}
        assert not any(m.training for m in policy.modules()) and policy.lm.config._attn_implementation == attention
    intermediate = policy.lm.config.intermediate_size
    assert saved[True] < saved[False] and saved["selective"] < saved["mlp only"] < saved[False]
    assert intermediate in widths[False] and intermediate not in widths["selective"]
    for mode in (True, "mlp only", "selective"):
        assert grads[mode].keys() == grads[False].keys() and grads[mode]
        for name in grads[mode]:
            torch.testing.assert_close(grads[mode][name], grads[False][name], rtol=1e-4, atol=1e-6)


def test_selective_checkpointing_needs_a_post_attention_norm_feeding_the_mlp(tmp_path):
    """GPT-2's blocks name their norm ln_2: nothing is routed, and the PPO stage refuses the setting
    in one line naming it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from shomin.tasks.ground.errors import ConfigError
    from shomin.tasks.models.levers import selective_checkpoint
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert selective_checkpoint.enable(gpt2) == 0
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="^stages.ppo.gradient_checkpointing: selective needs .*GPT2LMHeadModel"):
        ppo.build_policy(settings(gradient_checkpointing="selective"), ModelSpec(source=str(tmp_path / "gpt2")),
                         str(tmp_path / "gpt2"), "cpu")


def test_ppo_raises_an_easy_reward(tiny_model, tmp_path):
    # One prompt, two-token responses, reward = share of ASCII letters in the response: a contextual
    # bandit that PPO solves in a few dozen CPU steps on every seed tried (1-4: ~0.3 -> ~1.0).
    model = sharpened(tiny_model, tmp_path / "model")
    merge, data = inputs(tmp_path, model, [{"prompt": "The movie was", "completion": "good"}] * 8)
    s = settings(reward=RewardSettings(kind="function", function="ppo_rewards:response_letters"), steps=20,
                 batch_size=8, mini_batch_size=4, ppo_epochs=4, learning_rate=1e-3,
                 response_min_tokens=2, response_max_tokens=2, save_steps=100)
    result = run_stage("ppo", s, tmp_path / "ppo", model=ModelSpec(source=str(model)), inputs={"merge": merge, "dataset": data}, device="cpu", seed=1)

    log = json.loads((tmp_path / "ppo" / "ppo_log.json").read_text())
    assert [e["step"] for e in log] == list(range(1, 21)) and result.steps == 20
    assert set(log[0]) >= {"reward_mean", "reward_std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss",
                           "clip_fraction", "approx_kl", "response_length", "step_seconds"}
    assert log[0]["kl"] == 0.0
    first = sum(e["reward_mean"] for e in log[:3]) / 3
    last = sum(e["reward_mean"] for e in log[-3:]) / 3
    assert last > first + 0.2, [round(e["reward_mean"], 3) for e in log]
    assert result.metrics["reward_final"] == pytest.approx(last)


def test_outputs_load_and_training_resumes_exactly(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = [{"text": t} for t in ["The film was a quiet triumph of craft.", "Every scene drags and the plot is thin.",
                                  "A warm, funny and moving story.", "I will not watch it again."]]
    merge, data = inputs(tmp_path, tiny_model, rows)
    spec, ckpt = ModelSpec(source=str(tiny_model)), tmp_path / "ckpt"
    stage_inputs = {"merge": merge, "dataset": data}
    # the core alone leaves its checkpoints, as a run killed after step 2 would (the registry's
    # checkpoint store removes them only after a successful stage)
    first = ppo.run(stage_context("ppo", settings(steps=2, save_steps=1), tmp_path / "a", model=spec,
                                  checkpoint_dir=ckpt), stage_inputs)
    assert first.resumed_from_step is None and first.steps == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2"]
    resumed = ppo.run(stage_context("ppo", settings(steps=4, save_steps=1), tmp_path / "b", model=spec,
                                    checkpoint_dir=ckpt), stage_inputs)
    run_stage("ppo", settings(steps=4, save_steps=1), tmp_path / "c", model=spec, inputs=stage_inputs)
    assert not (tmp_path / ".c.checkpoints").exists()   # the store removes them once the stage succeeded
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-3", "step-4"]  # keeps the last two
    log_b = json.loads((tmp_path / "b" / "ppo_log.json").read_text())
    log_c = json.loads((tmp_path / "c" / "ppo_log.json").read_text())
    assert [e["step"] for e in log_b] == [1, 2, 3, 4]
    for key in ("reward_mean", "kl", "policy_loss", "value_loss"):  # 2 + 2 steps == 4 steps
        assert [e[key] for e in log_b] == [e[key] for e in log_c], key

    assert Path(resumed.value_head_path).is_file() and resumed.merged_path is None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merge.merged_path), resumed.adapter_path)
    logits = model(**model_inputs(resumed.adapter_path)).logits
    assert torch.isfinite(logits).all()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it was trained


def model_inputs(tokenizer_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_path)(["The movie was"], return_tensors="pt")


def test_merge_adapter_writes_a_plain_checkpoint(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM
    merge, data = inputs(tmp_path, tiny_model, [{"prompt": "The movie was", "completion": "good"}] * 4)
    result = run_stage("ppo", settings(steps=1, merge_adapter=True), tmp_path / "ppo",
                       model=ModelSpec(source=str(tiny_model)), inputs={"merge": merge, "dataset": data})
    merged = AutoModelForCausalLM.from_pretrained(result.merged_path)
    assert torch.isfinite(merged(**model_inputs(result.merged_path)).logits).all()


def test_non_finite_loss_raises(tiny_model, tmp_path):
    merge, data = inputs(tmp_path, tiny_model, [{"prompt": "The movie was", "completion": "good"}] * 4)
    s = settings(steps=1, reward=RewardSettings(kind="function", function="ppo_rewards:huge"))
    with pytest.raises(TrainingDiverged, match="ppo: loss became"):
        run_stage("ppo", s, tmp_path / "ppo", model=ModelSpec(source=str(tiny_model)), inputs={"merge": merge, "dataset": data}, device="cpu")
    assert not (tmp_path / "ppo").exists()


def test_evaluate_policy(tiny_model, tmp_path):
    from peft import get_peft_model
    s, spec = settings(), ModelSpec(source=str(tiny_model))
    fresh = tmp_path / "fresh"
    get_peft_model(load_causal_lm(tiny_model, spec, "cpu"), lora_config(s.lora)).save_pretrained(fresh)
    state = torch.get_rng_state()
    out = rl.evaluate_policy(str(tiny_model), str(fresh), spec, s, QUERIES, seed=3, samples=3, max_new_tokens=5)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's random numbers are not touched
    # a fresh adapter is the SFT model: the same samples on both sides, so a gain and a KL of exactly 0
    assert out["kl_ppo"] == 0.0 and out["kl_ppo_se"] == 0.0
    assert out["reward_gain"] == 0.0 and out["reward_gain_se"] == 0.0
    assert out["reward_ppo"] == out["reward_sft"] and out["reward_ppo_se"] == out["reward_sft_se"]
    assert [x["sft"] for x in out["samples"]] == [x["ppo"] for x in out["samples"]]
    assert [x["query"] for x in out["samples"]] == QUERIES
    assert out["samples_per_query"] == 3 and out["n_queries"] == len(QUERIES)

    merge, data = inputs(tmp_path, tiny_model, [{"prompt": q, "completion": "x"} for q in QUERIES])
    trained = run_stage("ppo", settings(steps=3, learning_rate=2e-2), tmp_path / "ppo", model=spec,
                        inputs={"merge": merge, "dataset": data})
    one = rl.evaluate_policy(str(tiny_model), trained.adapter_path, spec, s, QUERIES, seed=3)
    assert all(math.isfinite(one[k]) for k in ("reward_sft", "reward_ppo", "kl_ppo", "reward_gain_se"))
    assert one["kl_ppo"] > -0.5  # an unbiased estimate of a KL: non-negative up to sampling noise
    assert len(one["samples"]) == len(QUERIES)
    many = rl.evaluate_policy(str(tiny_model), trained.adapter_path, spec, s, QUERIES, seed=3, samples=8)
    assert many["reward_gain_se"] < one["reward_gain_se"] and many["kl_ppo_se"] < one["kl_ppo_se"]


def test_build_queries_takes_openings_or_prompts(tiny_model, tmp_path):
    tok = ppo.load_tokenizer(tiny_model)
    _, text = inputs(tmp_path, tiny_model, [{"text": "The film was a quiet triumph of craft and care."}] * 20)
    queries = rl.build_queries(text.train_path, tok, settings(query_min_tokens=2, query_max_tokens=4), seed=0)
    lengths = {len(tok(q, add_special_tokens=False).input_ids) for q in queries}
    assert lengths <= {2, 3, 4} and len(lengths) > 1
    assert all("The film was a quiet triumph".startswith(q) for q in queries)
    _, inst = inputs(tmp_path, tiny_model, [{"prompt": "指示: 挨拶\n", "completion": "応答: こんにちは"}])
    assert rl.build_queries(inst.train_path, tok, settings(), seed=0) == ["指示: 挨拶\n"]


def test_two_concurrent_ppo_runs_with_the_same_inputs_keep_their_checkpoints(tiny_model, tmp_path):
    """Two runs of the same inputs at once share a checkpoint key: the second gets a private
    folder instead of resuming from, or rotating away, the first one's checkpoints."""
    import threading
    rows = [{"text": t} for t in ["A fine film.", "A dull film.", "Warm and funny.", "Thin plot."]]
    merge, data = inputs(tmp_path, tiny_model, rows)
    spec, ckpt = ModelSpec(source=str(tiny_model)), tmp_path / ".checkpoints" / "same-key"
    seen, results, errors = [], {}, []

    def run(name):
        try:
            ctx = stage_context("ppo", settings(steps=3, save_steps=1), tmp_path / name, model=spec, checkpoint_dir=ckpt)
            results[name] = registry.execute(registry.get("ppo"), ctx, {"merge": merge, "dataset": data})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    real_save = ppo.save_checkpoint

    def watching_save(root, step, *args, **kwargs):
        seen.append((str(root), step))
        return real_save(root, step, *args, **kwargs)
    ppo.save_checkpoint = watching_save
    try:
        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ppo.save_checkpoint = real_save
    assert not errors, errors
    assert results["a"].steps == results["b"].steps == 3
    roots = {root for root, _ in seen}
    assert len(roots) == 2 and str(ckpt) in roots   # one run in the keyed folder, the other in its own
    for root in roots:                             # each saved steps 1, 2, 3 into its folder, none lost
        assert sorted(step for r, step in seen if r == root) == [1, 2, 3]
    assert not ckpt.exists() and not list(ckpt.parent.glob("same-key.concurrent-*"))


def test_data_parallel_processes_stay_in_step(tiny_model, tmp_path):
    """Two processes (torchrun, gloo) sample different queries; averaging their gradients after each
    mini-batch keeps their policies identical, and training moves them."""
    import subprocess
    import sys
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"The movie number {i} was a story of {i} days"}) + "\n"
                            for i in range(16)))
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(TESTS / "ppo_data_parallel.py"), str(tiny_model),
                        str(data), str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    for a, b in zip(ranks[0]["after"], ranks[1]["after"]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["before"], ranks[1]["before"]):   # the LoRA starts from rank 0's on both
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["before"], ranks[0]["after"]))
    assert len(ranks[0]["log"]) == 2
