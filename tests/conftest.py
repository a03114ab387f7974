"""Shared fixtures: tiny random checkpoints of each supported family, saved by `transformers`."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A byte-level tokenizer: every string encodes, and the vocabulary stays tiny.
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama3-rope": dict(
        model_type="llama",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0,
    ),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=4096),
    "qwen2": dict(model_type="qwen2"),
}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE
    )


def save_tiny_checkpoint(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `transformers` model of `family`, with the byte tokenizer, to `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer()
    params = dict(FAMILIES[family])
    model_type = params.pop("model_type")
    params = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        **params,
    )
    params.update(overrides)
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; a larger spread makes greedy
    # decoding decisive, so parity tests do not hinge on near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def svd_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the SVD caches of tiny test models out of the user's cache folder."""
    import svf

    monkeypatch.setattr(svf, "default_svd_cache", lambda model: tmp_path / "svd-cache" / "svd.safetensors")


@pytest.fixture(params=list(FAMILIES))
def tiny_checkpoint(request, tmp_path):
    return save_tiny_checkpoint(tmp_path / request.param, request.param)


def data_dir() -> Path | None:
    path = Path(os.environ.get("PALORA_DATA_DIR", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None
