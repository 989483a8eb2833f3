"""Model shapes of ../shared/bench/stock_qlora_sft.py (plus a tiny one for CPU dry runs):
(model_type, config kwargs), for AutoConfig.for_model."""

SHAPES = {
    "neox20b": ("gpt_neox", dict(hidden_size=6144, intermediate_size=24576, num_hidden_layers=44,
                                 num_attention_heads=64, vocab_size=50432, max_position_embeddings=2048,
                                 rotary_pct=0.25, use_parallel_residual=True)),
    "neox7b": ("gpt_neox", dict(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                                num_attention_heads=32, vocab_size=52224, max_position_embeddings=2048,
                                rotary_pct=1.0, use_parallel_residual=False)),
    "tiny": ("gpt_neox", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=512, max_position_embeddings=256, rotary_pct=0.25)),
    "llama7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                              max_position_embeddings=4096)),
    "llama3_8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=131072, rope_theta=500000.0)),
    "qwen2_7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                               max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False)),
}


def few_layers_checkpoint(arch: str, layers: int, path):
    """Random fp16 weights of ARCH's width with only `layers` layers, written to `path` once (on
    the GPU): the per-layer benches compare two depths of it."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(path)
    if not (path / "config.json").exists():
        kind, kw = SHAPES[arch]
        config = AutoConfig.for_model(kind, **{**kw, "num_hidden_layers": layers})
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(path, max_shard_size="4GB")
        del model
        torch.cuda.empty_cache()
    return path
