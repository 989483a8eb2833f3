"""Padding-free micro-batches (tasks/models/levers/padding_free.py) are exact: the same loss and
gradients as the padded batch of the same rows, in float64, with SDPA's block-diagonal mask
(any device) and through the varlen attention path (here with a stand-in for PyTorch's CUDA
kernel that follows its contract: packed [tokens, heads, d], cumulative row starts)."""
import pytest
import torch
from shomin.tasks.models.levers import padding_free

pytestmark = pytest.mark.unit

ROWS = [[5, 9, 14, 3, 7, 21, 8], [11, 4, 6], [30, 2, 19, 25, 12]]   # three lengths: padding in the padded batch


def tiny(arch: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if arch == "llama":   # grouped-query attention
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, rotary_pct=0.5, attn_implementation="sdpa"))
    return model.double()


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batches():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    rows = [{"input_ids": r, "labels": r} for r in ROWS]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert free["input_ids"].shape == (1, sum(map(len, ROWS))) and "attention_mask" not in free
    return padded, free


def varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """Row by row SDPA over the packed tokens: what PyTorch's varlen kernel computes."""
    assert window_size == (-1, 0)
    out = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        part = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out.append(torch.nn.functional.scaled_dot_product_attention(*part, is_causal=True, scale=scale,
                                                                    enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("attention", ["sdpa-mask", "varlen"])
def test_padding_free_batch_matches_the_padded_one_in_float64(arch, attention, monkeypatch):
    model = tiny(arch)
    padded, free = batches()
    ref_loss, ref = loss_and_grads(model, padded)
    if attention == "varlen":
        monkeypatch.setattr(padding_free, "varlen_kernel", lambda: varlen_stand_in)
    assert padding_free.prepare(model, "cuda" if attention == "varlen" else "cpu") == (attention == "varlen")
    assert (model.config._attn_implementation == padding_free.VARLEN) == (attention == "varlen")
    loss, got = loss_and_grads(model, free)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_rows_of_one_length_go_as_a_plain_batch_through_the_varlen_implementation(monkeypatch):
    """Nothing to remove: the collator sends the plain batch, and the varlen implementation hands
    it to SDPA (no row boundaries, no mask) with the same result as before."""
    model = tiny("llama")
    rows = [{"input_ids": r[:3], "labels": r[:3]} for r in ROWS]
    collate = padding_free.collator(type("Tok", (), {"pad_token_id": 0})())
    batch = collate(rows)
    assert batch["input_ids"].shape == (3, 3) and "position_ids" not in batch
    ref_loss, ref = loss_and_grads(model, batch)
    monkeypatch.setattr(padding_free, "varlen_kernel", lambda: varlen_stand_in)
    padding_free.prepare(model, "cuda")
    loss, got = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert collate([{"input_ids": r, "labels": r} for r in ROWS])["input_ids"].shape[0] == 1


def test_rows_would_leak_into_each_other_without_the_restarting_positions():
    """The check above has teeth: the same flat row read as one sequence gives another loss."""
    model = tiny("llama")
    padded, free = batches()
    ref_loss, _ = loss_and_grads(model, padded)
    padding_free.prepare(model, "cpu")
    one_sequence = {"input_ids": free["input_ids"], "labels": free["labels"],
                    "position_ids": torch.arange(free["input_ids"].shape[1])[None]}
    loss, _ = loss_and_grads(model, one_sequence)
    assert abs(loss.item() - ref_loss.item()) > 1e-6


def test_auto_is_off_where_it_would_cost_and_an_unknown_architecture_is_refused():
    from shomin.tasks.ground.errors import ConfigError
    from shomin.tasks.stages.sft import SftSettings, use_padding_free
    model = tiny("llama")
    assert not use_padding_free(SftSettings(), model, "cpu")             # a dense mask: quadratic in the micro-batch
    assert use_padding_free(SftSettings(padding_free=True), model, "cpu")
    model.config.model_type = "some_new_arch"
    with pytest.raises(ConfigError, match="stages.sft.padding_free: some_new_arch"):
        use_padding_free(SftSettings(padding_free=True), model, "cpu")
