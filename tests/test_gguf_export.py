"""GGUF export: real files written by gguf-py, read back by transformers (`gguf_file=`) and
by gguf's own reader, compared with the source folder's model. No mocks.

Logit closeness is measured as max |a - b| over all positions and vocabulary, divided by the
standard deviation of the reference logits (scale-free, so random tiny models and SmolLM2
share one yardstick), plus the share of positions whose next-token argmax agrees.
Measured on SmolLM2-135M (2 chat prompts, 76 positions): f16 0.0055 and 100 %; q8_0 0.28
and 96 %. The bounds below sit a few times above that.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
import torch
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.models.gguf_export import SUPPORTED, export_gguf, modelfile

from tests.conftest import _corpus

F16_REL, F16_AGREE = 0.02, 0.98
Q8_REL, Q8_AGREE = 0.75, 0.85
MIXED = "日本語のテキストと English text: 東京は2024年に晴れ… ok?"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATS = [[{"role": "user", "content": "日本の首都はどこですか?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about the sea."}]]


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _closeness(ref, other, batches) -> tuple[float, float]:
    """(max abs logit difference / std of reference logits, argmax agreement share)."""
    diffs, scales, agree, total = [], [], 0, 0
    with torch.no_grad():
        for ids in batches:
            a, b = ref(ids).logits[0], other(ids).logits[0]
            diffs.append((a - b).abs().max().item())
            scales.append(a.std().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            total += a.shape[0]
    return max(diffs) / min(scales), agree / total


def _reader(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    fields = {k: reader.fields[k].contents() for k in reader.fields if k not in big}
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


# --- SmolLM2-135M, the embedded model --------------------------------------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from shomin.tasks.ground.settings import ModelSpec
    from shomin.tasks.stages.model_init import resolve_source
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # Module scope runs before conftest's per-test SHOMIN_CACHE, so the cache is passed explicitly.
    cache = os.environ.get("SHOMIN_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    path = resolve_source(ModelSpec(source="embedded:smollm2-135m-instruct"), cache)
    tok = AutoTokenizer.from_pretrained(str(path))
    return path, tok, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("outtype, rel_bound, agree_bound, weight_type",
                         [("f16", F16_REL, F16_AGREE, "F16"), ("q8_0", Q8_REL, Q8_AGREE, "Q8_0")])
def test_smollm2_round_trips_through_transformers(smol, tmp_path, outtype, rel_bound, agree_bound, weight_type):
    path, tok, ref = smol
    out = export_gguf(path, tmp_path / f"smollm2-{outtype}.gguf", outtype, name="SmolLM2-135M-Instruct")
    model, gtok = _load_gguf(out)
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    batches = [tok(t, return_tensors="pt").input_ids for t in texts]
    rel, agree = _closeness(ref, model, batches)
    assert rel < rel_bound and agree >= agree_bound, (rel, agree)
    assert gtok(MIXED).input_ids == tok(MIXED).input_ids
    assert gtok.apply_chat_template(CHATS[1], tokenize=False) == tok.apply_chat_template(CHATS[1], tokenize=False)
    fields, types = _reader(out)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[outtype]
    assert "output.weight" not in types   # tied head: llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == weight_type
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]   # no temp file left over


@pytest.mark.slow
def test_modelfile_for_smollm2_is_chatml(smol):
    _, tok, _ = smol
    text = modelfile("smollm2-q8_0.gguf", tok)
    assert text.startswith("FROM ./smollm2-q8_0.gguf\n")
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>' in text
    assert "{{ .Prompt }}<|im_end|>" in text and "<|im_start|>assistant\n{{ .Response }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text   # the template's default


# --- tiny random models ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def chatml_tokenizer():
    """Byte-level BPE trained offline with Qwen2's split regex and ChatML special tokens."""
    from tokenizers import ByteLevelBPETokenizer, Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    bpe = ByteLevelBPETokenizer()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(_corpus(), vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def _tiny_qwen2(folder: Path, tok, hidden: int, intermediate: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    # 13 spare embedding rows, as real Qwen2 pads its vocabulary: the GGUF must list them too
    config = Qwen2Config(vocab_size=len(tok) + 13, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():   # biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, chatml_tokenizer):
    return _tiny_qwen2(tmp_path_factory.mktemp("qwen2"), chatml_tokenizer, hidden=64, intermediate=128)


def _source(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(str(folder)), model


@pytest.mark.parametrize("outtype, rel_bound, agree_bound", [("f16", F16_REL, F16_AGREE), ("q8_0", Q8_REL, Q8_AGREE)])
def test_tiny_qwen2_round_trips(tiny_qwen2, tmp_path, outtype, rel_bound, agree_bound):
    tok, ref = _source(tiny_qwen2)
    out = export_gguf(tiny_qwen2, tmp_path, outtype)   # a folder: the file is named for us
    assert out.parent == tmp_path and out.name.endswith(f"-{outtype}.gguf")
    model, gtok = _load_gguf(out)
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS] + [MIXED]
    rel, agree = _closeness(ref, model, [tok(t, return_tensors="pt").input_ids for t in texts])
    assert rel < rel_bound and agree >= agree_bound, (rel, agree)
    assert all(gtok(t).input_ids == tok(t).input_ids for t in texts)
    assert gtok.eos_token == "<|im_end|>" and gtok.chat_template == CHATML
    fields, types = _reader(out)
    assert fields["general.architecture"] == "qwen2" and fields["qwen2.vocab_size"] == len(tok) + 13
    assert fields["qwen2.rope.freq_base"] == ref.config.rope_parameters["rope_theta"]
    assert types["blk.0.attn_q.bias"] == "F32" and types["output.weight"] == types["blk.1.ffn_down.weight"]


def test_q8_0_keeps_f16_where_rows_do_not_fill_blocks(chatml_tokenizer, tmp_path):
    """hidden 48 is no multiple of 32: rows of that length stay f16; ffn_down's rows (96) do not."""
    folder = _tiny_qwen2(tmp_path / "src", chatml_tokenizer, hidden=48, intermediate=96)
    out = export_gguf(folder, tmp_path / "out" / "m.gguf", "q8_0")
    _, types = _reader(out)
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "F16"
    tok, ref = _source(folder)
    model, _ = _load_gguf(out)
    rel, agree = _closeness(ref, model, [tok(MIXED, return_tensors="pt").input_ids])
    assert rel < Q8_REL and agree >= Q8_AGREE, (rel, agree)


@pytest.mark.parametrize("outtype, rel_bound, agree_bound", [("f16", F16_REL, F16_AGREE), ("q8_0", Q8_REL, Q8_AGREE)])
def test_tiny_untied_llama_round_trips(tiny_model, tmp_path, outtype, rel_bound, agree_bound):
    tok, ref = _source(tiny_model)
    # conftest's tokenizer splits with the plain GPT-2 regex: say so instead of the llama default
    out = export_gguf(tiny_model, tmp_path / "tiny.gguf", outtype, pre="gpt-2")
    model, gtok = _load_gguf(out)
    texts = ["指示: 次の文を要約してください。\n入力: 今日は晴れです。\n応答:", MIXED]
    rel, agree = _closeness(ref, model, [tok(t, return_tensors="pt").input_ids for t in texts])
    assert rel < rel_bound and agree >= agree_bound, (rel, agree)
    assert all(gtok(t).input_ids == tok(t).input_ids for t in texts)
    fields, types = _reader(out)
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert "output.weight" in types   # untied: the head is its own tensor
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16


def test_modelfile_without_chatml_leaves_template_to_ollama(tiny_model, chatml_tokenizer):
    from transformers import AutoTokenizer
    plain = modelfile("tiny-f16", AutoTokenizer.from_pretrained(str(tiny_model)))   # no chat template at all
    assert plain.startswith("FROM ./tiny-f16.gguf\n") and "TEMPLATE" not in plain.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE" in plain and 'PARAMETER stop "</s>"' in plain
    chatml = modelfile("q.gguf", chatml_tokenizer)
    assert 'TEMPLATE """' in chatml and "SYSTEM" not in chatml   # ChatML without a default system prompt


# --- refusals --------------------------------------------------------------------------------

def test_unsupported_architecture_is_a_one_line_config_error(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    src = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128)).save_pretrained(src)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ConfigError) as err:
        export_gguf(src, dest / "neox.gguf", "f16")
    message = str(err.value)
    assert "\n" not in message and "GPTNeoXForCausalLM" in message and "gpt_neox" in message
    assert all(arch in message for arch in SUPPORTED)
    assert list(dest.iterdir()) == []


def test_unknown_outtype_is_a_config_error(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="q4_k.*f16, q8_0"):
        export_gguf(tiny_model, tmp_path / "x.gguf", "q4_k")   # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
