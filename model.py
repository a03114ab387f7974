"""A hand-written decoder for the Llama family as Hugging Face stores it.

Supported `model_type`s: llama (Llama 2/3/3.1, SmolLM2), mistral, qwen2.
Parameter names follow Hugging Face one-to-one, so a checkpoint loads with
strict key and shape checks and the MLP projections are plain `nn.Linear`
modules that later stages can rebuild or wrap.

Shapes and symbols used in comments:
    B  batch size            T  new tokens in this call
    L  cached + new tokens   D  hidden size
    H  query heads           K  key/value heads
    hd head size             V  vocabulary size

Command line:
    python model.py prepare smollm2-135m-instruct   # build the default model folder
    python model.py chat MODEL "question" ...       # print greedy chat replies
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("palora.model")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o bias (Llama's flag)
    qkv_bias: bool = False  # q/k/v bias only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build a config from a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU) is implemented")
        heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf(hf)
        sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen2 stores a window it does not use unless enabled
        eos = hf.get("eos_token_id")
        if eos is None:
            eos_ids = ()
        else:
            eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            qkv_bias=model_type == "qwen2",
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=sliding_window,
            eos_token_ids=eos_ids,
            extra=hf,
        )


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes `rope_parameters`; older configs and most hub
    # checkpoints carry `rope_theta` and `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, llama3")
    return theta, scaling


# ---------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in float32 and cast back before the scale, as the
        # reference implementations do, so bf16 runs match them.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Return the RoPE inverse frequencies (hd/2,), with Llama 3 scaling applied."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3.1 frequency scaling: long wavelengths are divided by `factor`,
    # short ones are kept, and the band between is interpolated smoothly.
    sc = cfg.rope_scaling
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_context = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, interpolated, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """A preallocated key/value cache for one layer; `update` writes at `start`."""

    def __init__(self, B, K, max_len, hd, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, K, max_len, hd, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, K, max_len, hd, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, hd
        self.q_proj = nn.Linear(D, H * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attention_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_start: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.cache is not None:
            k, v = self.cache.update(cache_start, k, v)  # (B, K, L, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(torch.autograd.Function):
    """The SwiGLU product silu(gate) * up, saving only gate and up for the backward pass.

    Autograd would also keep silu(gate), one more (B, T, intermediate) tensor
    per layer. Recomputing it in backward costs one sigmoid and saves that memory.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # aten's fused silu_backward is the kernel autograd itself uses for F.silu.
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, M = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, M, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(D, M, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(M, D, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The stack that Hugging Face names `model.*`: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache_start: int = 0):
        """Run the decoder and return the final normalized hidden states (B, T, D).

        `attention_mask` (B, L) marks real tokens with 1 over the cached and
        new positions together. Without it, and without a cache, attention is
        plain causal, which is also right for right-padded batches.
        """
        B, T = input_ids.shape
        if attention_mask is None and cache_start > 0:
            # SDPA's is_causal aligns the mask to the top-left corner, which is
            # wrong once cached keys precede the queries.
            attention_mask = torch.ones(B, cache_start + T, dtype=torch.long, device=input_ids.device)
        if self.config.sliding_window is not None and cache_start + T > self.config.sliding_window:
            raise ValueError(
                f"sequence of {cache_start + T} tokens exceeds sliding_window={self.config.sliding_window}; "
                "sliding-window attention is not implemented, so use shorter inputs"
            )
        if position_ids is None:
            position_ids = self._positions(attention_mask, T, cache_start, input_ids.device)
        mask = self._attention_mask(attention_mask, T, cache_start)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # (B or 1, 1, T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache_start)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache_start: int = 0):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache_start))  # (B, T, V)

    @staticmethod
    def _positions(attention_mask, T, cache_start, device):
        if attention_mask is None:
            # One row for the whole batch: RoPE's cos and sin then broadcast over it.
            return torch.arange(cache_start, cache_start + T, device=device)[None]  # (1, T)
        # Left padding: a sequence's first real token gets position 0.
        positions = attention_mask.long().cumsum(-1) - 1
        return positions[:, cache_start : cache_start + T].clamp(min=0)

    @staticmethod
    def _attention_mask(attention_mask, T, cache_start):
        if attention_mask is None:
            return None
        L = cache_start + T
        keys = attention_mask[:, None, None, :L].bool()  # (B, 1, 1, L)
        if T == 1:
            return keys  # one new token attends to every real cached key and to itself
        causal = torch.ones(T, L, dtype=torch.bool, device=keys.device).tril(cache_start)
        # A padding query would see only padding keys; letting it see itself
        # keeps its softmax finite, so no NaN reaches later layers.
        own = torch.zeros(T, L, dtype=torch.bool, device=keys.device)
        own[torch.arange(T), torch.arange(cache_start, L)] = True
        return (causal & keys) | own  # (B, 1, T, L)

    def setup_cache(self, B: int, max_len: int):
        p = self.lm_head.weight
        for block in self.model.layers:
            attn = block.self_attn
            attn.cache = KVCache(B, attn.n_kv_heads, max_len, attn.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.cache = None


# ---------------------------------------------------------------------------
# Loading


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is."""


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder for a model name, a folder path or a hub id.

    The name `smollm2-135m-instruct` prepares the default model on first use.
    A hub id is resolved through `huggingface_hub` only when no local folder
    has that name.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text.lower() == DEFAULT_MODEL:
        from default_model import prepare_default_model

        return prepare_default_model()
    # "org/name" is a hub id unless "org" is a local folder: then it is a mistyped path.
    looks_like_hub_id = (
        text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text.split("/")[0]).is_dir()
    )
    if path.exists() or not looks_like_hub_id:
        raise CheckpointError(
            f"model path not found: {text!r}; pass a folder with config.json and *.safetensors, "
            f"a hub id such as 'meta-llama/Llama-3.1-8B-Instruct', or {DEFAULT_MODEL!r}"
        )
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer*", "special_tokens_map.json", "chat_template.jinja"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types: offline, gated, not found
        raise CheckpointError(
            f"could not fetch {text!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "check the id and network access, or pass a local folder"
        ) from e


def read_config(folder: Path) -> ModelConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {folder}; a Hugging Face checkpoint folder needs one")
    with open(config_path) as f:
        hf = json.load(f)
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{config_path} lacks the field {e.args[0]!r}") from e


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {folder}; convert .bin checkpoints to safetensors first")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f.name} named in {index} is missing from {folder}")
    return files


def load_weights(model: CausalLM, files: list[Path], dtype: torch.dtype, device) -> None:
    """Load safetensors shards into a model built on the meta device, tensor by tensor.

    Every parameter is replaced by the loaded tensor, so peak memory is one
    copy of the weights. Missing, unexpected and mis-shaped tensors raise.
    """
    from safetensors import safe_open

    expected = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    seen = set()
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}; the file is corrupt or truncated") from e
        with handle:
            for name in handle.keys():
                if tied and name == "lm_head.weight":
                    continue  # some tied checkpoints store the shared matrix twice
                if name not in expected:
                    raise CheckpointError(f"unexpected tensor {name!r} in {path.name}")
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise CheckpointError(
                        f"tensor {name!r} in {path.name} has shape {shape}, the config implies {tuple(expected[name].shape)}"
                    )
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}; the file is truncated") from e
                _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def load_model(name_or_path="smollm2-135m-instruct", dtype=torch.float32, device="cpu"):
    """Load a checkpoint and its tokenizer; return `(model, tokenizer)`.

    The model is in eval mode with `requires_grad=False` on every parameter,
    so each stage switches on exactly what it trains.
    """
    from transformers import AutoTokenizer

    folder = resolve_checkpoint(name_or_path)
    cfg = read_config(folder)
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = CausalLM(cfg)
    load_weights(model, files, dtype, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(cfg).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.name_or_path = str(name_or_path)
    model.folder = folder
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------
# Helpers shared by the stage scripts


def option(default, help: str):
    """Declare a dataclass field that `config_parser` turns into a command-line option."""
    return field(default=default, metadata={"help": help})


def config_parser(config_class, doc: str) -> argparse.ArgumentParser:
    """Build an argument parser with one `--option` per field of a config dataclass."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if "default" not in help_text:
            default_text = f.default
            if kind is bool:
                default_text = flag if f.default else "--no-" + flag.removeprefix("--")
            help_text += f" (default: {default_text})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary name, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def cache_dir() -> Path:
    """Return the folder for prepared models and SVD caches: $PALORA_CACHE or ~/.cache/palora."""
    return Path(os.environ.get("PALORA_CACHE", Path.home() / ".cache" / "palora")).expanduser()


def torch_save_atomic(obj, path: Path) -> None:
    """Write a torch.save checkpoint through a temporary name, so a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Generation and scoring


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # every generated token, the final EOS included
    text: str  # decoded without special tokens, cut before a stop string
    finish_reason: str  # "eos", "stop" or "length"


def stop_token_ids(model: CausalLM, tokenizer) -> set[int]:
    """Return the ids that end a sequence: the config's, the generation config's and the tokenizer's EOS."""
    ids = set(model.config.eos_token_ids)
    generation_config = Path(getattr(model, "folder", "")) / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        if isinstance(eos, list):
            ids.update(eos)
        elif eos is not None:
            ids.add(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Tokenize prompt strings; lists of ids pass through.

    Strings are encoded without special tokens because chat templates
    already contain them (Llama 3's BOS, for example).
    """
    if all(isinstance(p, str) for p in prompts):
        return tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [list(p) for p in prompts]


def pad_left(sequences: list[list[int]], pad_id: int, device):
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), P, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, P - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s) :] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Pick the next token (B,) from last-position logits (B, V): greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLM, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0,
             stop=(), generator=None) -> list[Generation]:
    """Decode a batch with a KV cache; each sequence stops on its own at EOS, a stop string or the limit.

    `prompts` are strings (already chat-formatted) or lists of token ids.
    Batches are left-padded. `generator` seeds sampling.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_ids = encode_prompts(tokenizer, prompts)
    device = model.lm_head.weight.device
    eos = torch.tensor(sorted(stop_token_ids(model, tokenizer)), device=device)
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id, device)
    B, P = ids.shape
    mask = torch.cat([mask, torch.ones(B, max_new_tokens, dtype=mask.dtype, device=device)], dim=1)
    new_tokens = torch.full((B, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    state = [["length", max_new_tokens] for _ in range(B)]  # finish reason, tokens generated

    model.setup_cache(B, P + max_new_tokens)
    try:
        x, start = ids, 0
        for t in range(max_new_tokens):
            h = model.hidden_states(x, mask[:, : start + x.shape[1]], cache_start=start)
            token = sample_next(model.lm_head(h[:, -1]), temperature, top_p, generator)
            token = token.masked_fill(finished, tokenizer.pad_token_id)
            new_tokens[:, t] = token
            start, x = start + x.shape[1], token[:, None]

            done = torch.isin(token, eos) & ~finished
            for i in done.nonzero().flatten().tolist():
                state[i] = ["eos", t + 1]
            if stop:
                done |= _stop_string_hits(tokenizer, new_tokens[:, : t + 1], finished | done, stop)
                for i in done.nonzero().flatten().tolist():
                    if state[i][0] == "length":
                        state[i] = ["stop", t + 1]
            finished |= done
            if bool(finished.all()):
                break
    finally:
        model.clear_cache()
    return _collect(tokenizer, prompt_ids, new_tokens.tolist(), state, stop)


def _stop_string_hits(tokenizer, tokens, finished, stop):
    hit = torch.zeros_like(finished)
    for i in (~finished).nonzero().flatten().tolist():
        text = tokenizer.decode(tokens[i], skip_special_tokens=True)
        hit[i] = any(s in text for s in stop)
    return hit


def _collect(tokenizer, prompt_ids, tokens, state, stop) -> list[Generation]:
    results = []
    for prompt, row, (reason, n) in zip(prompt_ids, tokens, state):
        row = row[:n]
        text = tokenizer.decode(row, skip_special_tokens=True)
        if reason == "stop":
            text = text[: min(text.find(s) for s in stop if s in text)]
        results.append(Generation(prompt, row, text, reason))
    return results


def completion_logprobs(model: CausalLM, prompt_ids, completion_ids):
    """Return per-token log-probabilities of completions after prompts, and their mask, both (B, C).

    C is the longest completion. Gradients flow when enabled. Only the
    completion positions go through `lm_head`, so no (B, T, V) logits tensor
    is ever built.
    """
    device = model.lm_head.weight.device
    sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(s) for s in sequences)
    C = max(len(c) for c in completion_ids)
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    # Right padding needs no mask: causal attention never lets a real token
    # see the padding after it.
    h = model.hidden_states(ids.to(device))  # (B, T, D)

    rows, cols, slots = [], [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        for j in range(len(c)):
            rows.append(i)
            cols.append(len(p) + j - 1)  # the position that predicts completion token j
            slots.append(j)
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    targets = ids.to(device)[rows_t, cols_t + 1]
    logits = model.lm_head(h[rows_t, cols_t]).float()  # (N, V)
    picked = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    logprobs = torch.zeros(len(sequences), C, device=device, dtype=picked.dtype)
    mask = torch.zeros(len(sequences), C, device=device, dtype=torch.bool)
    slots_t = torch.tensor(slots, device=device)
    logprobs = logprobs.index_put((rows_t, slots_t), picked)
    mask[rows_t, slots_t] = True
    return logprobs, mask


def chat(model, tokenizer, questions: list[str], max_new_tokens=128, system: str | None = None) -> list[str]:
    """Return greedy answers to user messages, formatted with the tokenizer's chat template."""
    prompts = []
    for q in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


# ---------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare the default model, or chat with a model.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help=f"build the Hugging Face folder of {DEFAULT_MODEL}")
    prepare.add_argument("name", choices=[DEFAULT_MODEL], help="the model to prepare")
    talk = commands.add_parser("chat", help="print greedy chat answers to questions")
    talk.add_argument("model", help=f"model folder, hub id or {DEFAULT_MODEL}")
    talk.add_argument("questions", nargs="+", help="user messages, one answer each")
    talk.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit in tokens (default: 128)")
    talk.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    talk.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default: float32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    if args.command == "prepare":
        from default_model import prepare_default_model

        print(prepare_default_model())
        return
    try:
        model, tokenizer = load_model(args.model, resolve_dtype(args.dtype), resolve_device(args.device))
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for question, answer in zip(args.questions, chat(model, tokenizer, args.questions, args.max_new_tokens)):
        print(f"> {question}\n{answer}\n")


if __name__ == "__main__":
    main()
