"""A merged safetensors folder -> one GGUF file, for llama.cpp and Ollama.

Only Llama (SmolLM2 is one) and Qwen2 with byte-level BPE tokenizers: the shapes this
project fine-tunes. Everything GGUF-specific -- tensor names, metadata keys, q8_0 blocks,
the file layout -- comes from the `gguf` package (gguf-py, llama.cpp's own writer), so the
file is what llama.cpp expects and what transformers' GGUF loader reads back.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from shomin.tasks.ground.errors import ConfigError

SUPPORTED = ("llama", "qwen2")
OUTTYPES = ("f16", "q8_0")

# llama.cpp picks the regex that splits text before BPE from `tokenizer.ggml.pre`; its own
# converter finds the name by hashing the tokenizer's output on a fixed probe text and looking
# the hash up. We have no such table, so the name comes from the model type: the project's
# Llama is SmolLM2 ("smollm"), Qwen2 is "qwen2". Pass `pre=` for any other vocabulary
# (Llama 3: "llama-bpe"; a plain GPT-2 regex, as tokenizers' ByteLevelBPETokenizer: "gpt-2").
PRE_TOKENIZER = {"llama": "smollm", "qwen2": "qwen2"}

# Ollama's prompt/response template for ChatML, the shape SmolLM2 and Qwen2 chat in.
CHATML_TEMPLATE = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""


def export_gguf(model_dir: Path, dest: Path, outtype: Literal["f16", "q8_0"], name: str | None = None,
                pre: str | None = None) -> Path:
    """Write `model_dir` as GGUF to `dest` (a .gguf path, or a folder to put `<name>-<outtype>.gguf`
    in) and return the file. 2-D weights become f16 or q8_0; norms and biases stay f32.

    Everything that can be refused (architecture, outtype, tokenizer, tensor names) is checked
    before the file is opened, and the file appears only complete (temp file + os.replace).
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF outtype {outtype!r} is unknown; use one of: {', '.join(OUTTYPES)}")
    import gguf
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    arch = gguf.MODEL_ARCH.LLAMA if config.model_type == "llama" else gguf.MODEL_ARCH.QWEN2
    name = name or model_dir.name
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    _add_hparams(writer, config, outtype, name)
    _add_tokenizer(writer, model_dir, config, pre or PRE_TOKENIZER[config.model_type])
    plan = _plan_tensors(writer, model_dir, config, arch, outtype)
    dest = Path(dest)
    if dest.suffix != ".gguf":
        dest = dest / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-{outtype}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        _write(writer, Path(tmp), plan, config, arch)
        os.replace(tmp, dest)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def check_supported(model_dir: Path) -> None:
    """Refuses, in one line, a model this writer cannot represent, before anything is merged."""
    _rope_theta(_read_config(Path(model_dir)))


def _read_config(model_dir: Path):
    """The transformers config, refused early for what the writer cannot represent faithfully."""
    from transformers import AutoConfig
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json; GGUF export needs a merged transformers model folder")
    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type not in SUPPORTED:
        arch = ", ".join(config.architectures or []) or config.model_type
        raise ConfigError(f"GGUF export does not support {arch} (model_type {config.model_type!r}); "
                          f"supported model types: {', '.join(SUPPORTED)}")
    # transformers rebuilds a Llama from GGUF without biases, so they would be dropped silently
    biased = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if config.model_type == "llama" and biased:
        raise ConfigError(f"{model_dir}: GGUF export does not support a Llama with attention_bias or mlp_bias")
    return config


def _rope_theta(config) -> float:
    """GGUF here carries plain RoPE only; scaled variants (llama3, yarn, ...) need keys and
    tensors we do not write, so they are refused rather than exported subtly wrong."""
    rope = getattr(config, "rope_parameters", None) or {}   # transformers 5 keeps theta here
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export supports default RoPE only, not rope_type {rope['rope_type']!r}")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hparams(writer, config, outtype: str, name: str) -> None:
    """The `<arch>.*` keys llama.cpp needs to build the graph; transformers maps them back to
    the config (integrations/ggml.py GGUF_CONFIG_MAPPING)."""
    import gguf
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)   # transformers reads a Llama's head_dim from this key
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, model_dir: Path, config, pre: str) -> None:
    """Vocabulary, token types, merges, special ids and chat template under `tokenizer.*`.

    The token list is as long as the embedding matrix: llama.cpp requires that, and ids the
    tokenizer never produces (a padded Qwen2 vocabulary) are written as unused `[PADn]`."""
    import gguf
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    spec = json.loads(tok.backend_tokenizer.to_str())
    kind, decoder = spec["model"]["type"], (spec.get("decoder") or {}).get("type")
    if kind != "BPE" or decoder != "ByteLevel":
        raise ConfigError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers only (gpt2-style); "
                          f"this one is {kind} with a {decoder} decoder")
    n_vocab, vocab = config.vocab_size, tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ConfigError(f"{model_dir}: tokenizer ids reach {max(vocab.values())}, the model has {n_vocab} embeddings")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():   # control tokens are never split or merged
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")   # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # SpecialVocab reads merges and special-token ids from the folder's files, as llama.cpp does
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab,
                                special_token_types=("bos", "eos", "unk", "pad"))
    probe = tok("a")["input_ids"]   # what the tokenizer really adds, whatever its config says
    special.add_special_token = {"bos": tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id],
                                 "eos": tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]}
    if isinstance(tok.chat_template, str):
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)


def _qtype(shape: tuple[int, ...], outtype: str):
    """f32 for 1-D tensors (norms, biases: small and precision-critical), else f16 or q8_0;
    q8_0 packs 32 values of a row per block, so other row lengths stay f16."""
    import gguf
    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return q.Q8_0
    return q.F16


def _plan_tensors(writer, model_dir: Path, config, arch, outtype: str) -> list[tuple[Path, str, str, object]]:
    """Register every tensor's GGUF name, shape and type before reading any data, so the header
    is written first and weights are then streamed one at a time (peak memory: one tensor)."""
    import gguf
    from safetensors import safe_open
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    plan = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():   # noqa: SIM118 -- safe_open is not iterable
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue   # recomputed by every runtime / the tied head is token_embd itself
                gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ConfigError(f"{file.name}: tensor {key} has no GGUF name for {config.model_type}")
                shape = tuple(f.get_slice(key).get_shape())
                qtype = _qtype(shape, outtype)
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)   # f16/f32 included
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
                plan.append((file, key, gguf_name, qtype))
    if not plan:
        raise ConfigError(f"{model_dir} has no *.safetensors weights")
    return plan


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head (rotate-half); GGUF llama rotates adjacent
    pairs. Reordering q/k rows gives the same attention scores; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(writer, path: Path, plan, config, arch) -> None:
    """Header, metadata, tensor table, then each tensor converted as it is written."""
    import gguf
    from safetensors import safe_open
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Qwen2 runs NEOX (rotate-half) RoPE in llama.cpp, so only llama's q/k are reordered
    heads = {"attn_q.weight": config.num_attention_heads,
             "attn_k.weight": config.num_key_value_heads or config.num_attention_heads}
    with contextlib.ExitStack() as stack:
        files = {file: stack.enter_context(safe_open(file, "pt")) for file in {item[0] for item in plan}}
        for file, key, gguf_name, qtype in plan:
            w = files[file].get_tensor(key).float().numpy()
            n_head = heads.get(gguf_name.split(".", 2)[-1])
            if arch == gguf.MODEL_ARCH.LLAMA and n_head:
                w = _permute_rope(w, n_head)
            writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(w), qtype))
    writer.close()


def _chatml_system(tokenizer) -> str | None:
    """The default system prompt if the chat template renders ChatML ("" when it adds none),
    or None when it renders anything else. Judged by rendering, not by reading the Jinja."""
    from jinja2 import TemplateError

    def turn(role: str, text: str) -> str:
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"

    def render(*messages: dict) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    tail = turn("user", "U") + "<|im_start|>assistant\n"
    try:
        with_system = render({"role": "system", "content": "S"}, {"role": "user", "content": "U"})
        bare = render({"role": "user", "content": "U"})
    except (ValueError, TypeError, TemplateError):   # no template (ValueError), or one that wants other inputs
        return None
    if with_system != turn("system", "S") + tail or not bare.endswith(tail):
        return None
    default = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", bare[:-len(tail)], re.DOTALL)
    return default.group(1) if default else ("" if bare == tail else None)


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for the GGUF `gguf_name` next to it: ChatML gets an explicit Go
    TEMPLATE (plus the template's default system prompt); anything else is left to Ollama."""
    file = Path(gguf_name).name
    file = file if file.endswith(".gguf") else f"{file}.gguf"
    lines, eos = [f"FROM ./{file}"], tokenizer.eos_token
    system = _chatml_system(tokenizer)
    if system is None:
        lines.append("# No TEMPLATE: the chat template is not ChatML, so Ollama derives one from the "
                     "GGUF's tokenizer.chat_template metadata.")
        stops = [eos] if eos else []
    else:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops = ["<|im_end|>", "<|im_start|>"] + ([eos] if eos else [])
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
