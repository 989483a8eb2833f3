"""The fused LoRA layer (tasks/models/levers/fast_lora.py) against autograd in float64, and against
PEFT's own layers on a real (tiny) model, dense and 4-bit."""
import pytest
import torch
from shomin.tasks.ground.settings import LoraSettings, ModelSpec
from shomin.tasks.models.levers.fast_lora import LoraLinear, fuse_lora_layers, lora_linear


def _inputs(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(12, 10, bias=bias).to(dtype)
    x = torch.randn(3, 5, 12, dtype=dtype, generator=g, requires_grad=True)
    a = torch.randn(4, 12, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(10, 4, dtype=dtype, generator=g, requires_grad=True)
    return base, x, a, b


@pytest.mark.parametrize("keep", [1.0, 0.7])
def test_hand_written_backward_matches_numerical_gradients_in_float64(keep):
    base, x, a, b = _inputs()

    def f(x, a, b):   # the same dropout draw on every call gradcheck makes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return LoraLinear.apply(x, keep, base, a, b, 0.5)

    assert torch.autograd.gradcheck(f, (x, a, b), eps=1e-6, atol=1e-8)


def test_the_backward_redraws_the_forwards_mask_and_leaves_the_random_state_alone():
    """Only x and the random state are kept: the backward's mask must be the forward's even when
    other draws come in between, and drawing it again must not move anyone else's numbers."""
    base, x, a, b = _inputs()
    torch.manual_seed(5)
    y = LoraLinear.apply(x, 0.6, base, a, b, 1.5)
    torch.rand(1000)   # other work draws between the forward and the backward
    after_other_draws = torch.get_rng_state()
    y.square().sum().backward()
    assert torch.equal(torch.get_rng_state(), after_other_draws)
    got = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    torch.manual_seed(5)
    _, mask = torch.native_dropout(x.detach(), 0.4, True)
    ref = base(x) + 1.5 * ((x * mask / 0.6) @ a.t()) @ b.t()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    ref.square().sum().backward()
    for g, t in zip(got, (x, a, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-10)


def test_matches_the_unfused_formula_with_its_own_dropout_mask():
    base, x, a, b = _inputs()
    torch.manual_seed(3)
    y = lora_linear(x, base, a, b, scale=2.0, dropout=0.3, training=True)
    torch.manual_seed(3)   # the same draw: native_dropout's mask, rebuilt for the reference
    _, mask = torch.native_dropout(x.detach(), 0.3, True)
    ref = base(x) + 2.0 * ((x * mask / 0.7) @ a.t()) @ b.t()
    assert not mask.all()   # dropout did drop something
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    ref.square().sum().backward()
    for g, t in zip(got, (x, a, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-10)


def test_eval_mode_does_not_drop():
    base, x, a, b = _inputs()
    y = lora_linear(x, base, a, b, scale=1.0, dropout=0.5, training=False)
    torch.testing.assert_close(y, base(x) + (x @ a.t()) @ b.t())


def _peft_model(tiny_model, quantization: str, dropout: float):
    from peft import get_peft_model
    from shomin.tasks.models.loading import load_causal_lm, lora_config
    spec = ModelSpec(source=str(tiny_model), quantization=quantization, dtype="float32", compute_dtype="float32")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny_model, spec, "cpu"),
                           lora_config(LoraSettings(r=4, alpha=8, dropout=dropout, target_modules="all-linear")))
    for name, p in model.named_parameters():
        if "lora_B" in name:   # B starts at 0; give it values so every gradient path is exercised
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_fused_model_trains_like_peft(tiny_model, quantization):
    """Same loss and same gradient on every LoRA weight as PEFT's layers (dropout 0: same draw)."""
    model = _peft_model(tiny_model, quantization, dropout=0.0)
    model.train()
    x = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = _loss_and_grads(model, x)
    n_lora = sum(1 for n in ref if "lora_A" in n)
    assert fuse_lora_layers(model) == n_lora == 14   # 7 linears x 2 layers
    loss, got = _loss_and_grads(model, x)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_model_applies_dropout_and_falls_back_when_adapter_disabled(tiny_model):
    model = _peft_model(tiny_model, "none", dropout=0.5)
    fuse_lora_layers(model)
    x = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        eval_logits = model(x).logits
        with model.disable_adapter():
            base_logits = model(x).logits
    model.train()
    with torch.no_grad():
        train_logits = model(x).logits
    assert not torch.allclose(eval_logits, base_logits)      # LoRA is active
    assert not torch.allclose(train_logits, eval_logits)     # and dropped in training
