"""GPU-only checks of the kernels the SFT stage routes to (CUDA needed; CI has none).

Liger's RoPE kernel, used for GPT-NeoX by tasks/models/levers/kernels.py, against transformers' own
apply_rotary_pos_emb, in float32, for full (neox7b) and partial (neox20b, 25%) rotation;
Liger's LayerNorm against torch's in bf16 (output within bf16 rounding, gradient within 1%);
then the SFT stage on a tiny GPT-NeoX with `kernels: liger` trains with Liger's RoPE routed in
and leaves transformers' own rotary function in place when it ends (the levers' undo).
Usage: python bench/gpu_check_kernels.py [kernels]   (one JSON line a check; exit 1 on a mismatch;
  kernels: up to the int8 GEMM checks only)
"""
import json
import sys

import torch
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox import modeling_gpt_neox

reference = modeling_gpt_neox.apply_rotary_pos_emb
worst = {}
for pct in (1.0, 0.25):
    config = GPTNeoXConfig(hidden_size=512, num_attention_heads=4, rotary_pct=pct, max_position_embeddings=256)
    rope = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 4, 128, 3 * 128, device="cuda", generator=g)   # strided q/k views, as in the model
    q, k, _ = qkv.chunk(3, dim=-1)
    cos, sin = rope(q, torch.arange(128, device="cuda")[None].expand(2, -1))
    want_q, want_k = reference(q, k, cos, sin)
    got_q, got_k = liger_rotary_pos_emb(q.clone(), k.clone(), cos, sin)
    worst[f"rotary_pct={pct}"] = max((got_q - want_q).abs().max().item(), (got_k - want_k).abs().max().item())
# Liger's LayerNorm (GPT-NeoX's norms) against torch's, bf16 activations as in training
from liger_kernel.functional import layer_norm  # noqa: E402

x = torch.randn(4, 256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ln = torch.nn.LayerNorm(4096, device="cuda", dtype=torch.bfloat16)
torch.nn.init.normal_(ln.weight, 1.0, 0.1), torch.nn.init.normal_(ln.bias, 0.0, 0.1)
want = ln(x)
gx_want, = torch.autograd.grad(want.float().square().sum(), x)
got = layer_norm(x, ln.weight, ln.bias, ln.eps)
gx_got, = torch.autograd.grad(got.float().square().sum(), x)
worst["layer_norm_out_bf16"] = (got.float() - want.float()).abs().max().item()
worst["layer_norm_grad_rel"] = ((gx_got.float() - gx_want.float()).norm() / gx_want.float().norm()).item()
ok = all(v < 1e-5 for k, v in worst.items() if k.startswith("rotary")) \
    and worst["layer_norm_out_bf16"] < 0.07 and worst["layer_norm_grad_rel"] < 0.01
print(json.dumps({"check": "liger rope (float32) and layer norm (bf16) vs transformers/torch", "max_abs_diff": worst, "ok": ok}))


def sft_stage_restores_the_rotary() -> dict:
    """The real SFT stage with Liger on CUDA: the patch is in during training, gone after."""
    import tempfile
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks import registry
    from shomin.tasks.ground.contract import StageContext
    from shomin.tasks.ground.records import DataResult, ModelResult
    from shomin.tasks.ground.settings import LoraSettings, ModelSpec
    from shomin.tasks.stages.sft import SftSettings
    from transformers import GPTNeoXForCausalLM

    from tests.conftest import ROOT, make_tiny_model
    work = Path(tempfile.mkdtemp())
    tok = make_tiny_model(work / "tok")
    config = GPTNeoXConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=256, rotary_pct=0.25)
    GPTNeoXForCausalLM(config).save_pretrained(work / "neox", safe_serialization=True)
    for f in tok.glob("*tok*"):
        (work / "neox" / f.name).write_bytes(f.read_bytes())
    rows = [json.loads(line)["text"] for line in open(ROOT / "data" / "movie-reviews.jsonl", encoding="utf-8")][:16]
    (work / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    data = DataResult(stage="dataset", output_dir=str(work), train_path=str(work / "train.jsonl"),
                      eval_path="-", format="text", n_train=len(rows), n_eval=0)
    model = ModelResult(stage="model_init", output_dir="-", model_path=str(work / "neox"),
                        tokenizer_path=str(work / "neox"), num_parameters=0, architecture="GPTNeoXForCausalLM")
    seen = []
    real_apply = registry.get("sft").run

    def watch(ctx, inputs):   # what transformers' module holds while the stage trains
        from transformers import TrainerCallback

        class Look(TrainerCallback):
            def on_step_end(self, *a, **k):
                seen.append(modeling_gpt_neox.apply_rotary_pos_emb is liger_rotary_pos_emb)
        from shomin.tasks.stages import sft
        build = sft.build_trainer

        def with_look(*a, **k):
            trainer, levers = build(*a, **k)
            trainer.add_callback(Look())
            return trainer, levers
        sft.build_trainer = with_look
        try:
            return real_apply(ctx, inputs)
        finally:
            sft.build_trainer = build
    settings = SftSettings(lora=LoraSettings(r=4, alpha=8), max_steps=3, batch_size=2, micro_batch_size=2,
                           max_seq_length=64, logging_steps=1, kernels="liger", gradient_checkpointing=True)
    ctx = StageContext(stage="sft", settings=settings, model=ModelSpec(source=str(work / "neox")), device="cuda",
                       out_dir=str(work / "sft"))
    from dataclasses import replace
    registry.execute(replace(registry.get("sft"), run=watch), ctx, {"model_init": model, "dataset": data})
    return {"liger_during_training": all(seen) and bool(seen),
            "own_rotary_after": modeling_gpt_neox.apply_rotary_pos_emb is reference}


def varlen_matches_padded() -> dict:
    """Padding-free rows through PyTorch's varlen flash kernel (levers/padding_free.py) against the
    padded batch of the same rows through SDPA: a tiny grouped-query Llama in bf16."""
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks.models.levers import padding_free
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    if padding_free.varlen_kernel() is None:
        return {"varlen_kernel": False}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2)).cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": r, "labels": r} for r in (torch.randint(3, 512, (n,), generator=g).tolist() for n in (300, 77, 190))]

    def run(batch):
        model.zero_grad()
        loss = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}).loss
        loss.backward()
        return loss.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])
    want_loss, want_grad = run(DataCollatorForLanguageModeling(pad_token_id=0)(rows))
    used = padding_free.prepare(model, "cuda")
    got_loss, got_grad = run(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows))
    return {"varlen_kernel": used, "loss_rel": ((got_loss - want_loss).abs() / want_loss).item(),
            "grad_rel": ((got_grad - want_grad).norm() / want_grad.norm()).item()}


def int8_weight_only_matches() -> dict:
    """An 8-bit load routed through levers/int8_weights.py (model.int8_matmul: weight_only) against
    the fp16 model it was quantized from and against bitsandbytes' LLM.int8 on the same weights:
    logits of a GPT-NeoX at the 20B shape's width (fp16, 2 layers) and, with a LoRA on
    query_key_value, the gradient of its A matrices."""
    import tempfile
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import checkout  # noqa: F401 - shomin from this checkout
    from peft import get_peft_model
    from shomin.tasks.ground.settings import LoraSettings, ModelSpec
    from shomin.tasks.models.levers import int8_weights
    from shomin.tasks.models.loading import load_causal_lm, lora_config
    from transformers import GPTNeoXForCausalLM
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp()) / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=2048, hidden_size=6144, num_hidden_layers=2, num_attention_heads=64,
                                     intermediate_size=24576, rotary_pct=0.25)).half().save_pretrained(path)
    ids = torch.randint(3, 2048, (4, 24), generator=torch.Generator().manual_seed(1)).cuda()
    out, routed = {}, {}
    for name, quant, mode in (("fp16", "none", "weight_only"), ("weight_only", "8bit", "weight_only"),
                              ("llm_int8", "8bit", "llm_int8")):
        lm = load_causal_lm(path, ModelSpec(source=str(path), dtype="float16", int8_matmul=mode), "cuda", quantization=quant)
        routed[name] = sum(getattr(getattr(m, "forward", None), "__func__", None) is int8_weights._forward
                           for m in lm.modules())
        torch.manual_seed(2)
        peft = get_peft_model(lm, lora_config(LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["query_key_value"])))
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        logits = peft(input_ids=ids).logits.float()
        logits.logsumexp(-1).mean().backward()
        grad = torch.cat([p.grad.float().flatten() for n, p in peft.named_parameters() if "lora_A" in n])
        out[name] = (logits.detach(), grad)
        del peft, lm
        torch.cuda.empty_cache()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"layers_routed": routed["weight_only"], "layers_routed_llm_int8": routed["llm_int8"],
            **{f"{k}_logits_rel_vs_fp16": rel(out[k][0], out["fp16"][0]) for k in ("weight_only", "llm_int8")},
            **{f"{k}_lora_grad_rel_vs_fp16": rel(out[k][1], out["fp16"][1]) for k in ("weight_only", "llm_int8")}}


def int8_kernel_matches_portable() -> dict:
    """levers/int8_kernel.py's Triton GEMM against the portable path (16-bit rows, torch's GEMM) on
    the 20B shape's layer sizes, forward and input gradient, at RL's row counts; and each one's
    time (ms, CUDA events, mean of 20) on the 20B MLP's first layer."""
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks.models.levers import int8_kernel, int8_weights as w8
    worst, times = 0.0, {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for n_out, n_in in ((18432, 6144), (6144, 24576)):
        cb = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, device="cuda", generator=g)
        scale = torch.rand(n_out, 1, device="cuda", generator=g) * 1e-3
        bias = torch.randn(n_out, device="cuda", generator=g).half()
        for m in (16, 96, 768):
            x = torch.randn(m, n_in, device="cuda", generator=g).half()
            gy = torch.randn(m, n_out, device="cuda", generator=g).half()
            pairs = ((int8_kernel.matmul(x, cb, scale.view(-1), bias, transposed=False), w8.portable_forward(x, cb, scale, bias)),
                     (int8_kernel.matmul(gy, cb, scale.view(-1), None, transposed=True), w8.portable_grad(gy, cb, scale)))
            for got, want in pairs:
                worst = max(worst, ((got.float() - want.float()).norm() / want.float().norm()).item())
            if n_out == 18432 and m == 96:
                for name, fn in (("kernel", lambda: int8_kernel.matmul(x, cb, scale.view(-1), bias, transposed=False)),
                                 ("portable", lambda: w8.portable_forward(x, cb, scale, bias))):
                    fn()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(20):
                        fn()
                    end.record()
                    torch.cuda.synchronize()
                    times[f"{name}_ms_18432x6144_m96"] = round(start.elapsed_time(end) / 20, 3)
    return {"kernel_vs_portable_rel": worst, **times}


kern = int8_kernel_matches_portable()
ok = ok and kern["kernel_vs_portable_rel"] < 2e-3
print(json.dumps({"check": "int8 Triton GEMM vs the portable weight-only path (fp16)", **kern, "ok": ok}))
if sys.argv[1:] == ["kernels"]:   # the GEMM checks alone
    sys.exit(0 if ok else 1)
int8 = int8_weight_only_matches()
ok = ok and int8["layers_routed"] == 8 and int8["layers_routed_llm_int8"] == 0 \
    and int8["weight_only_logits_rel_vs_fp16"] <= int8["llm_int8_logits_rel_vs_fp16"] \
    and int8["weight_only_logits_rel_vs_fp16"] < 0.05
print(json.dumps({"check": "8-bit layers weight-only vs LLM.int8, both against fp16", **int8, "ok": ok}))
varlen = varlen_matches_padded()
ok = ok and (not varlen["varlen_kernel"] or (varlen["loss_rel"] < 1e-2 and varlen["grad_rel"] < 3e-2))
print(json.dumps({"check": "padding-free rows via torch varlen flash attention vs the padded batch (bf16)", **varlen, "ok": ok}))
stage = sft_stage_restores_the_rotary()
ok = ok and all(stage.values())
print(json.dumps({"check": "sft stage with kernels=liger on gpt_neox: patched while it trains, undone after", **stage, "ok": ok}))
sys.exit(0 if ok else 1)
