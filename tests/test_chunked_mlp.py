"""The SFT stage's chunked MLP (tasks/models/levers/chunked_mlp.py), in float64 against a
reference that runs the same chunks with autograd keeping everything: the same loss and
the same LoRA and input gradients, with LoRA dropout on (the backward's recompute must
see the forward's masks), alone and under the stage's own checkpointing with fused LoRA
(where a layer's recompute skips the MLP and the backward recomputes it chunk by chunk)."""
import pytest
import torch
from shomin.tasks.ground.settings import LoraSettings
from shomin.tasks.models.levers import checkpointing, chunked_mlp, fast_lora

CHUNK = 5   # 2 rows x 16 tokens: chunks cross the row boundary and the last one is short


def tiny(arch: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).double()
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, rotary_pct=0.25)).double()


def reference_chunks(model) -> None:
    """The same chunks in the same order (so the same dropout draws), every activation kept."""
    def chunked(orig):
        def forward(x):
            flat = x.reshape(-1, x.shape[-1])
            parts = [orig(flat[i:i + CHUNK].unsqueeze(0))[0] for i in range(0, flat.shape[0], CHUNK)]
            return torch.cat(parts).view(*x.shape[:-1], -1)
        return forward
    for layer in model.base_model.model.model.layers if hasattr(model.base_model.model, "model") else \
            model.base_model.model.gpt_neox.layers:
        layer.mlp.forward = chunked(layer.mlp.forward)


def run(arch: str, mode: str, dropout: float):
    from peft import get_peft_model
    from shomin.tasks.models.loading import lora_config
    model = get_peft_model(tiny(arch), lora_config(LoraSettings(r=4, alpha=8, dropout=dropout,
                                                                target_modules="all-linear")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    fn = None
    if mode in ("chunked+own", "chunked+offload"):
        fast_lora.fuse_lora_layers(model)
        fn = checkpointing.enable(model, offload=mode == "chunked+offload")
        fn.min_bytes = 0
        fast_lora.mark_residual_outputs(model)
    calls = []
    for name, module in model.named_modules():
        if name.endswith("mlp"):   # counts the MLP's own forward calls, chunk by chunk
            module.forward = (lambda orig: lambda *a: calls.append(1) or orig(*a))(module.forward)
    if mode.startswith("chunked"):
        assert chunked_mlp.enable(model, CHUNK) == 2
    else:
        reference_chunks(model)
    model.train()
    x = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(x).detach().requires_grad_(True)
    torch.manual_seed(1)
    loss = model(inputs_embeds=embeds, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    fn = fn and dict(fn.stats, mlp_calls=len(calls))
    return loss.detach(), grads, embeds.grad, fn


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("mode", ["chunked", "chunked+own", "chunked+offload"])
def test_chunked_mlp_matches_the_reference_in_float64(arch, mode):
    ref_loss, ref, ref_x, _ = run(arch, "reference", 0.2)
    loss, got, got_x, fn = run(arch, mode, 0.2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert set(got) == set(ref) and any("mlp" in n for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-9, atol=1e-12)
    if fn is not None:   # 7 chunks per layer: the first forward's and the backward's; the recompute skips them
        assert fn["recomputed"] == 2 and fn["mlp_calls"] == 2 * 7 * 2


def test_short_micro_batches_run_the_mlp_unchanged():
    """At or under the chunk size the MLP's own forward runs: no recompute, the same graph."""
    model = tiny("llama")
    mlp = model.model.layers[0].mlp
    chunked_mlp.enable(model, 32)
    x = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    y = mlp(x)
    assert type(y.grad_fn).__name__ != "ChunkedMLPBackward"
    y = mlp(torch.randn(2, 17, 32, dtype=torch.float64, requires_grad=True))
    assert type(y.grad_fn).__name__ == "ChunkedMLPBackward"


def test_the_sft_stage_chunks_the_mlp_when_training_begins(tmp_path, monkeypatch):
    """`stages.sft.mlp_chunk_tokens` reaches the Trainer's model: with 8-token chunks and
    micro-batches longer than that, every layer's MLP backward runs chunk by chunk. With
    `padding_free` on, the micro-batches reach the model as one row without padding."""
    from shomin.tasks.models.levers import padding_free
    from shomin.tasks.ground.records import DataResult, ModelResult
    from shomin.tasks.ground.rundir import write_text
    from shomin.tasks.ground.settings import ModelSpec
    from shomin.tasks.stages.sft import SftSettings
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.conftest import make_tiny_model
    from tests.helpers import run_stage
    tok_dir = make_tiny_model(tmp_path / "tok")
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    for f in tok_dir.glob("*tok*"):
        (folder / f.name).write_bytes(f.read_bytes())
    write_text(tmp_path / "train.jsonl", "".join('{"prompt": "指示: 長い文を書いてください\\n", "completion": "応答: %s"}\n'
                                                 % ("はい" * (1 + n % 2)) for n in range(4)))   # two lengths: padding
    data = DataResult(stage="dataset", output_dir=str(tmp_path), train_path=str(tmp_path / "train.jsonl"),
                      eval_path=str(tmp_path / "train.jsonl"), format="instruction", n_train=4, n_eval=4)
    model = ModelResult(stage="model_init", output_dir="-", model_path=str(folder), tokenizer_path=str(folder),
                        num_parameters=0, architecture="GPTNeoXForCausalLM")
    backward, chunks = chunked_mlp.ChunkedMLP.backward, []
    monkeypatch.setattr(chunked_mlp.ChunkedMLP, "backward",
                        staticmethod(lambda ctx, g: chunks.append(ctx.chunk) or backward(ctx, g)))
    made, batches = padding_free.collator, []

    def collator(tok):
        inner = made(tok)
        return lambda rows: batches.append(inner(rows)) or batches[-1]
    monkeypatch.setattr(padding_free, "collator", collator)
    settings = SftSettings(lora=LoraSettings(r=2, alpha=4, dropout=0.1), max_steps=2, batch_size=2, micro_batch_size=2,
                           max_seq_length=64, logging_steps=1, mlp_chunk_tokens=8, gradient_checkpointing=True,
                           padding_free=True)
    run_stage("sft", settings, tmp_path / "sft", model=ModelSpec(source=str(folder)),
              inputs={"model_init": model, "dataset": data})
    assert chunks == [8] * 4   # 2 layers x 2 steps
    flat = [b for b in batches if "position_ids" in b]   # micro-batches of two lengths, laid end to end
    assert flat and all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in flat)
    assert all((b["position_ids"] == 0).sum() == 2 for b in flat)   # two rows in each, positions restarting
