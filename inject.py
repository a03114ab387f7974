"""Stage 2b of PALoRA: inject facts with LoRA while keeping the update out of protected singular directions.

Notation, per target matrix W (m, n), with the SVF expert merged into W when one is given:
    A (r, n), B (m, r)      LoRA factors, A random and B = 0 at the start
    dW = c B A              the update, c = alpha / r; forward adds c B (A x) and never builds dW
    U_S (m, k), V_S (n, k)  protected left and right singular vectors, from probe.py

Methods:
    lora         loss = CE on the tokens of the target reply (answer and EOS).
    palora       loss = CE + lam * P, with
                     P = (1 / |W|) * sum over W of (||U_S^T dW||_F^2 + ||dW V_S||_F^2) / k_W,
                 computed as c (U_S^T B) A and c B (A V_S). Dividing by |W|, the number of
                 protected matrices, keeps lam independent of how many matrices there are.
                 Dividing by k_W makes P the mean squared update per protected direction, so
                 lam keeps its meaning across a sweep over k. The default lam = 1000 comes from
                 one measurement on SmolLM2-135M-Instruct: 90 matrices, k = 16 by |z - 1| of a
                 synthetic z = 1 + 0.013 N(0, 1), 250 facts, 2 epochs. The mean
                 ||U_S^T dW V_S||_F / ||dW||_F was 7.0e-3 at lam = 10 and 1.4e-4 at lam = 1000
                 (lora: 1.7e-2 after 6 epochs), and the final CE was 2.31 and 2.34.
    oplora       dW = (I - U_k U_k^T) B A (I - V_k V_k^T) with top-sigma components: the probe's
                 when its rule is top-sigma, otherwise the k largest singular values of the
                 expert's weight (k per matrix from the probe, else --k).
    palora-hard  the same projection with the probe's S.
The projections act on the factors in every forward pass, B -> B - U (U^T B) and
A -> A - (A V) V^T, so they hold after every optimizer step to float precision.

Outputs in --out:
    adapter.safetensors  {module}.lora_A (r, n) and {module}.lora_B (m, r). The hard methods store
                         the projected factors, so W + (alpha / r) B A is the trained weight for
                         every method (evaluate.py --adapter merges it that way). Metadata: rank,
                         alpha, target_modules, method, phrasing, base_model and the sha256 of the
                         probe, facts and expert files.
    summary.json         residuals of dW on S, recall, seconds per epoch, configuration
    log.jsonl            one object per step; recall checks add recall_em and recall_contains
    checkpoint.pt        A, B, optimizer, RNG and step; rerunning the same command resumes

Usage:
    python inject.py --method lora --facts 250 --out runs/inject/lora
    python inject.py --method palora --expert runs/svf/expert.safetensors \\
        --probe runs/probe/svf-k16.safetensors --lam 1000 --out runs/inject/palora
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import probe as P
import svf
import tasks
from evaluate import evaluate_examples, file_sha256, read_safetensors
from model import option

log = logging.getLogger("palora.inject")

METHODS = ("lora", "palora", "oplora", "palora-hard")
PHRASINGS = ("bare", "sentence")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Files of a Hugging Face folder that --export-hf copies unchanged beside the merged weights.
EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")
RESIDUALS = {
    "two_sided": "||U_S^T dW V_S||_F / ||dW||_F",
    "left": "||U_S^T dW||_F / ||dW||_F",
    "right": "||dW V_S||_F / ||dW||_F",
}


# ---------------------------------------------------------------------------
# The LoRA wrapper


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank path: y = W x + c B (A x), with c = alpha / rank.

    After `project(U, V)` the update is (I - U U^T) B A (I - V V^T). `merge()`
    writes W + dW into the base weight and is idempotent: a second call does
    nothing. `unmerge()` copies back the weight saved by `merge()`, so W is
    restored bit for bit. While merged, forward is the base layer alone.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        m, n = base.out_features, base.in_features
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # The factors stay in float32 whatever the base dtype, for AdamW's sake.
        # A gets nn.Linear's default initialization, uniform in +-1/sqrt(n)
        # (Kaiming uniform with a = sqrt(5)); B = 0 makes dW = 0 at the start.
        A = torch.empty(rank, n).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n), generator=generator)
        self.A = nn.Parameter(A.to(base.weight.device))  # (r, n)
        self.B = nn.Parameter(torch.zeros(m, rank, device=base.weight.device))  # (m, r)
        self.register_buffer("U", None, persistent=False)  # (m, k) projected out of B's columns
        self.register_buffer("V", None, persistent=False)  # (n, k) projected out of A's rows
        self.original: torch.Tensor | None = None  # W saved by merge()

    def project(self, U: torch.Tensor, V: torch.Tensor) -> None:
        m, n = self.base.out_features, self.base.in_features
        if U.shape[0] != m or V.shape[0] != n:
            raise ValueError(f"projection bases {tuple(U.shape)} and {tuple(V.shape)} do not fit a {m}x{n} weight")
        self.U = U.float().to(self.A.device)
        self.V = V.float().to(self.A.device)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the effective (B, A): projected when bases are set, else the parameters themselves."""
        B, A = self.B, self.A
        if self.U is not None:
            B = B - self.U @ (self.U.T @ B)  # (m, r)
            A = A - (A @ self.V) @ self.V.T  # (r, n)
        return B, A

    def delta_weight(self) -> torch.Tensor:
        """Build dW (m, n) in float32; for merging and reports, never for forward."""
        B, A = self.factors()
        return self.scale * (B @ A)

    def forward(self, x):
        y = self.base(x)
        if self.original is not None:
            return y
        B, A = self.factors()
        return y + F.linear(F.linear(x.to(A.dtype), A), self.scale * B).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.original is not None:
            return
        W = self.base.weight
        self.original = W.detach().clone()
        W.copy_((W.float() + self.delta_weight()).to(W.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.original is None:
            return
        self.base.weight.copy_(self.original)
        self.original = None


def target_names(model: nn.Module, attention: bool) -> list[str]:
    """Return the module names to adapt: every MLP projection, and the attention projections if asked."""
    names = list(svf.target_modules(model))
    if not attention:
        return names
    for name, module in model.named_modules():
        if ".self_attn." in name and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS and isinstance(module, nn.Linear):
            names.append(name)
    return names


def attach_lora(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Replace each named nn.Linear by a LoRALinear around it; return the wrappers by name."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        wrapped[name] = LoRALinear(model.get_submodule(name), rank, alpha, generator)
        setattr(model.get_submodule(parent), child, wrapped[name])
    return wrapped


@contextlib.contextmanager
def merged(lora: dict[str, LoRALinear]):
    """Merge every update for the duration of the block (fast generation), then restore W exactly."""
    for module in lora.values():
        module.merge()
    try:
        yield
    finally:
        for module in lora.values():
            module.unmerge()


# ---------------------------------------------------------------------------
# Penalty and residuals


def palora_penalty(lora: dict[str, LoRALinear], protected: dict) -> torch.Tensor:
    """Return P = mean over protected matrices of (||U_S^T dW||_F^2 + ||dW V_S||_F^2) / k, through the factors."""
    total = torch.zeros((), device=next(iter(lora.values())).A.device)
    for name, (U_S, V_S) in protected.items():
        module = lora[name]
        B, A = module.factors()
        left = module.scale * (U_S.T @ B) @ A  # (k, n) = U_S^T dW
        right = module.scale * B @ (A @ V_S)  # (m, k) = dW V_S
        total = total + (left.square().sum() + right.square().sum()) / U_S.shape[1]
    return total / len(protected)


@torch.no_grad()
def protected_residuals(lora: dict[str, LoRALinear], protected: dict) -> dict:
    """Return the relative residuals of dW on S per matrix and their mean over matrices (dW built once each)."""
    per_matrix = {}
    for name, (U_S, V_S) in protected.items():
        dW = lora[name].delta_weight()  # (m, n)
        norm = dW.norm().item()
        if norm == 0:
            per_matrix[name] = dict.fromkeys(RESIDUALS)  # no update, so no direction to measure
            continue
        per_matrix[name] = {
            "two_sided": (U_S.T @ dW @ V_S).norm().item() / norm,
            "left": (U_S.T @ dW).norm().item() / norm,
            "right": (dW @ V_S).norm().item() / norm,
        }
    mean = {}
    for key in RESIDUALS:
        values = [r[key] for r in per_matrix.values() if r[key] is not None]
        mean[key] = sum(values) / len(values) if values else None
    return {"definitions": RESIDUALS, "mean": mean, "per_matrix": per_matrix}


# ---------------------------------------------------------------------------
# Configuration


@dataclass
class InjectConfig:
    model: str = option("smollm2-135m-instruct", "base model folder, hub id, or smollm2-135m-instruct")
    method: str = option("lora", "lora, palora, oplora or palora-hard")
    expert: str | None = option(None, "SVF expert (z) file merged before injection (default: none, the base model)")
    probe: str | None = option(None, "probe file from probe.py: S for palora, palora-hard and the residual report")
    k: str = option("16", "oplora without a probe: top-sigma components per matrix, a count or a fraction of the rank")
    facts: int = option(250, "TriviaQA facts to inject: the first N of the facts split, as in evaluate.py --recall N")
    phrasing: str = option("bare", "training target: 'bare' (the answer alone) or 'sentence' ('The answer is X.')")
    rank: int = option(16, "LoRA rank r")
    alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha / rank")
    attention: bool = option(False, "also adapt the attention projections q, k, v and o (never protected)")
    lam: float = option(1000.0, "penalty weight lambda, >= 0; only palora uses it")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(1.0, "gradient-norm clipping threshold; 0 disables clipping")
    batch_size: int = option(16, "facts per optimizer step")
    epochs: int = option(8, "passes over the facts")
    log_every: int = option(4, "log interval in steps")
    eval_every: int = option(32, "interval in steps of a greedy recall check on --eval-size facts; 0 disables")
    eval_size: int = option(64, "facts in each recall check: the first of the injected facts")
    eval_batch_size: int = option(32, "prompts per generation batch in recall checks")
    final_recall: bool = option(True, "score greedy recall on all injected facts after training")
    save_every: int = option(16, "checkpoint interval in steps")
    seed: int = option(0, "seed of the LoRA initialization and of the batch order")
    data_seed: int = option(0, "seed of the facts' order; evaluate.py --seed must equal it to score the same facts")
    data_dir: str | None = option(None, "folder of local data files (default: $PALORA_DATA_DIR)")
    hub: bool = option(False, tasks.HUB_HELP)
    out: str = option("runs/inject", "output folder: adapter.safetensors, summary.json, log.jsonl, checkpoint.pt")
    export_hf: str | None = option(None, "also write a Hugging Face folder with the expert and adapter merged")
    svd_cache: str | None = option(None, "SVD cache file (default: inside $PALORA_CACHE or ~/.cache/palora)")
    dtype: str = option("float32", "model dtype: float32, bfloat16 or float16 (the LoRA factors stay float32)")
    device: str = option("auto", "cuda, cpu or auto (cuda when available)")


def parse_config(argv=None) -> InjectConfig:
    cfg = InjectConfig(**vars(M.config_parser(InjectConfig, __doc__).parse_args(argv)))
    validate_config(cfg)
    return cfg


def validate_config(cfg: InjectConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r} is unknown; choose one of {', '.join(METHODS)}")
    if cfg.lam < 0:
        raise ValueError(f"--lam must be >= 0, got {cfg.lam}; it weights a penalty that must not reward overlap with S")
    if cfg.method in ("palora", "palora-hard") and not cfg.probe:
        raise ValueError(f"--method {cfg.method} needs --probe, the protected set written by probe.py")
    if cfg.phrasing not in PHRASINGS:
        raise ValueError(f"--phrasing must be one of {', '.join(PHRASINGS)}, got {cfg.phrasing!r}")
    for name in ("facts", "rank", "batch_size", "epochs", "log_every", "eval_size", "eval_batch_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every < 0 or cfg.clip < 0 or cfg.weight_decay < 0 or cfg.lr <= 0 or cfg.alpha <= 0:
        raise ValueError(
            f"--eval-every, --clip and --weight-decay must be >= 0 and --lr, --alpha > 0; got {cfg.eval_every}, "
            f"{cfg.clip}, {cfg.weight_decay}, {cfg.lr}, {cfg.alpha}"
        )
    P.parse_k(cfg.k)
    M.resolve_dtype(cfg.dtype)


# ---------------------------------------------------------------------------
# Facts


def fact_target(example: tasks.Example, phrasing: str) -> str:
    """Return the training target for one fact: its canonical value (the first alias), bare or in a sentence."""
    value = example.answer[0]
    return value if phrasing == "bare" else f"The answer is {value}."


def encode_facts(tokenizer, facts: list, phrasing: str) -> list[tuple[list[int], list[int]]]:
    """Return (prompt ids, target ids) per fact; the target ends with EOS so the model learns to stop.

    Prompt and target are tokenized separately, as in generation, which
    starts from the chat-templated question and emits the assistant's reply.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one in tokenizer_config.json so targets can end with it")
    prompt_ids = M.encode_prompts(tokenizer, [tasks.build_prompt(tokenizer, e) for e in facts])
    targets = tokenizer([fact_target(e, phrasing) for e in facts], add_special_tokens=False)["input_ids"]
    return [(p, t + [tokenizer.eos_token_id]) for p, t in zip(prompt_ids, targets, strict=True)]


def load_facts(cfg: InjectConfig) -> tuple[list, tasks.Splits]:
    splits = tasks.load_splits("triviaqa", data_dir=cfg.data_dir, seed=cfg.data_seed, hub=cfg.hub)
    return tasks.sample_facts(splits, cfg.facts), splits


def batch_indices(step: int, n_facts: int, batch_size: int, seed: int) -> list[int]:
    """Return the fact indices of a step: each epoch is a permutation that depends only on (seed, epoch)."""
    per_epoch = math.ceil(n_facts / batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_facts, generator=generator).tolist()
    return order[position * batch_size : (position + 1) * batch_size]


def answer_loss(model: nn.Module, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Return the mean cross-entropy over the answer tokens of a batch; prompt tokens carry no loss."""
    logprobs, mask = M.completion_logprobs(model, [p for p, _ in pairs], [t for _, t in pairs])  # (B, C)
    return -(logprobs * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------
# Building the run: model, expert, protected bases, LoRA


def merge_checked_expert(cfg: InjectConfig, model, svd, fingerprint: str) -> dict | None:
    """Merge the expert into the model after checking it fits; return its z by module, or None."""
    if not cfg.expert:
        return None
    z, metadata = read_safetensors(cfg.expert)
    P.check_expert_fits(z, svd, cfg.expert)
    P.check_fingerprint(metadata, fingerprint, cfg.expert)
    svf.merge_expert(model, z, svd)
    return z


def check_probe_fits(probe: P.Probe, modules: dict[str, nn.Linear], fingerprint: str, expert_sha: str | None) -> None:
    """Raise ValueError when a probe was made for another model or from another expert."""
    for name, (U_S, V_S) in probe.bases.items():
        if name not in modules:
            raise ValueError(f"{probe.path} names module {name!r}, which is not an MLP projection of this model")
        m, n = modules[name].weight.shape
        if U_S.shape[0] != m or V_S.shape[0] != n:
            raise ValueError(
                f"{probe.path}: {name} has U_S {tuple(U_S.shape)} and V_S {tuple(V_S.shape)}, but this model's "
                f"weight there is {m}x{n}, so they need shapes ({m}, k) and ({n}, k); "
                "the probe was made for another model"
            )
    P.check_fingerprint(probe.metadata, fingerprint, probe.path)
    recorded = probe.metadata.get("expert_sha256")
    if recorded and recorded != expert_sha:
        made_from = f"expert {probe.metadata.get('expert', '?')} (sha256 {recorded[:12]})"
        passed_expert = f"--expert has sha256 {expert_sha[:12]}" if expert_sha else "no --expert was given"
        raise ValueError(
            f"{probe.path} was made from {made_from}, but {passed_expert}; pass the expert the probe was made from"
        )


def top_sigma_bases(svd: dict, z: dict | None, counts: dict[str, int | float]) -> dict:
    """Return {name: (U_k, V_k)} for the k largest singular values s * |z| of each expert weight."""
    bases = {}
    for name, k in counts.items():
        U, s, V = svd[name]
        scale = z[name].to(s) if z else torch.ones_like(s)
        idx = P.select_indices(scale, s, k, "top-sigma", 0, name).to(U.device)
        bases[name] = (U[:, idx], V[:, idx])
    return bases


def choose_bases(cfg: InjectConfig, svd, z, probe: P.Probe | None) -> tuple[dict, dict]:
    """Return (projection bases, protected set S for the penalty and the residual report)."""
    probe_bases = probe.bases if probe else {}
    if cfg.method == "palora-hard":
        return probe_bases, probe_bases
    if cfg.method != "oplora":
        return {}, probe_bases
    if probe and probe.metadata.get("rule") == "top-sigma":
        return probe_bases, probe_bases
    # Same budget as the probe when one is given, so oplora and palora protect as many directions.
    counts = {n: len(i) for n, i in probe.indices.items()} if probe else dict.fromkeys(svd, P.parse_k(cfg.k))
    projection = top_sigma_bases(svd, z, counts)
    return projection, probe_bases or projection


def needs_svd(cfg: InjectConfig, probe: P.Probe | None) -> bool:
    top_sigma_probe = probe is not None and probe.metadata.get("rule") == "top-sigma"
    return bool(cfg.expert) or (cfg.method == "oplora" and not top_sigma_probe)


@dataclass
class Injector:
    """Everything one injection run needs; `state_dict` is what a checkpoint holds."""

    cfg: InjectConfig
    model: M.CausalLM
    tokenizer: object
    facts: list  # tasks.Example, in training order
    encoded: list  # (prompt ids, target ids) per fact
    lora: dict[str, LoRALinear]
    protected: dict  # name -> (U_S (m, k), V_S (n, k)) on the model's device
    optimizer: torch.optim.Optimizer
    identity: dict  # what a resumed checkpoint must match
    step: int = 0
    epoch_seconds: list = field(default_factory=list)  # training seconds of each finished epoch
    epoch_elapsed: float = 0.0  # training seconds so far in the current epoch
    base_recall: dict | None = None  # recall check before the first step

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.encoded) / self.cfg.batch_size)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.lora.values() for p in (module.A, module.B)]

    def state_dict(self) -> dict:
        return {
            "A": {n: m.A.detach().clone() for n, m in self.lora.items()},
            "B": {n: m.B.detach().clone() for n, m in self.lora.items()},
            "optimizer": self.optimizer.state_dict(), "step": self.step, "torch_rng": torch.get_rng_state(),
            "epoch_seconds": self.epoch_seconds, "epoch_elapsed": self.epoch_elapsed,
            "base_recall": self.base_recall, "identity": self.identity,
        }

    def load_state_dict(self, state: dict, source: Path) -> None:
        changed = {k for k in self.identity.keys() | state["identity"].keys()
                   if self.identity.get(k) != state["identity"].get(k)}
        if changed:
            saved = state["identity"]
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {self.identity.get(k)!r}" for k in sorted(changed))
            raise ValueError(f"checkpoint {source} belongs to another run ({details}); pass another --out or delete it")
        with torch.no_grad():
            for name, module in self.lora.items():
                module.A.copy_(state["A"][name])
                module.B.copy_(state["B"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.base_recall = state["step"], state["base_recall"]
        self.epoch_seconds, self.epoch_elapsed = state["epoch_seconds"], state["epoch_elapsed"]


def run_identity(cfg: InjectConfig, fingerprint: str, shas: dict, facts: list) -> dict:
    """Return the settings that fix a run's trajectory; a checkpoint resumes only when they match."""
    keys = ("method", "k", "phrasing", "rank", "alpha", "attention", "lam", "lr", "weight_decay", "clip",
            "batch_size", "seed", "dtype")
    ids = hashlib.sha256("\n".join(e.id for e in facts).encode()).hexdigest()
    return {**{k: getattr(cfg, k) for k in keys}, "base_fingerprint": fingerprint, "facts_ids_sha256": ids, **shas}


def build_injector(cfg: InjectConfig) -> tuple[Injector, dict]:
    """Load data, model, expert and probe, attach LoRA; return the injector and the provenance of its inputs."""
    validate_config(cfg)
    facts, splits = load_facts(cfg)  # data errors show before the model loads
    probe = P.load_probe(cfg.probe) if cfg.probe else None
    device, dtype = M.resolve_device(cfg.device), M.resolve_dtype(cfg.dtype)
    model, tokenizer = M.load_model(cfg.model, dtype=dtype, device=device)
    modules = svf.target_modules(model)
    fingerprint = svf.weights_fingerprint(modules)
    shas = {"expert_sha256": file_sha256(cfg.expert) if cfg.expert else "",
            "probe_sha256": probe.sha256 if probe else ""}
    if probe:
        check_probe_fits(probe, modules, fingerprint, shas["expert_sha256"])

    svd = None
    if needs_svd(cfg, probe):
        cache = Path(cfg.svd_cache) if cfg.svd_cache else svf.default_svd_cache(model)
        svd = svf.load_or_compute_svd(model, cache)
    z = merge_checked_expert(cfg, model, svd, fingerprint)
    projection, protected = choose_bases(cfg, svd, z, probe)

    lora = attach_lora(model, target_names(model, cfg.attention), cfg.rank, cfg.alpha, cfg.seed)
    for name, (U, V) in projection.items():
        lora[name].project(U, V)
    protected = {n: (U.float().to(device), V.float().to(device)) for n, (U, V) in protected.items()}
    params = [p for module in lora.values() for p in (module.A, module.B)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    identity = run_identity(cfg, fingerprint, shas, facts)
    injector = Injector(cfg, model, tokenizer, facts, encode_facts(tokenizer, facts, cfg.phrasing), lora, protected,
                        optimizer, identity)
    facts_sha = (splits.sources[0].get("sha256") or "") if splits.sources else ""
    provenance = {**shas, "base_fingerprint": fingerprint, "facts_sha256": facts_sha,
                  "facts_ids_sha256": identity["facts_ids_sha256"], "model_folder": str(model.folder),
                  "protected_set": describe_protected(cfg, probe, projection)}
    return injector, provenance


def describe_protected(cfg: InjectConfig, probe: P.Probe | None, projection: dict) -> dict:
    if probe:
        if not projection:
            kind = None
        elif projection is probe.bases:
            kind = "probe"
        else:
            kind = "top-sigma"
        return {"source": str(probe.path), "rule": probe.metadata.get("rule"), "k": probe.metadata.get("k"),
                "projection": kind}
    if projection:
        return {"source": "top-sigma of the SVD", "rule": "top-sigma", "k": cfg.k, "projection": "top-sigma"}
    return {"source": None}


# ---------------------------------------------------------------------------
# Training


class NonFiniteLoss(RuntimeError):
    pass


def train_step(inj: Injector) -> dict:
    """Run one AdamW step on the next batch of facts; return its metrics."""
    cfg = inj.cfg
    t0 = time.perf_counter()
    batch = [inj.encoded[i] for i in batch_indices(inj.step, len(inj.encoded), cfg.batch_size, cfg.seed)]
    ce = answer_loss(inj.model, batch)
    if cfg.method == "palora":
        penalty = palora_penalty(inj.lora, inj.protected)
        loss = ce + cfg.lam * penalty
    else:
        with torch.no_grad():  # reported only: how far the update strays into S
            penalty = palora_penalty(inj.lora, inj.protected) if inj.protected else torch.zeros(())
        loss = ce
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()} at step {inj.step + 1}")

    inj.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = inj.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at step {inj.step + 1}")
    inj.optimizer.step()
    inj.step += 1
    return {
        "step": inj.step, "epoch": inj.step / inj.steps_per_epoch, "loss": loss.item(), "ce": ce.item(),
        "penalty": penalty.item(), "grad_norm": grad_norm.item(), "ms": 1000 * (time.perf_counter() - t0),
    }


@torch.no_grad()
def score_recall(inj: Injector, examples: list, desc: str) -> tuple[dict, list[dict]]:
    """Generate greedy completions with the update merged and score them as evaluate.py does."""
    with merged(inj.lora):
        return evaluate_examples(inj.model, inj.tokenizer, tasks.get_task("triviaqa"), examples,
                                 batch_size=inj.cfg.eval_batch_size, desc=desc)


def recall_check(inj: Injector) -> dict:
    examples = inj.facts[: inj.cfg.eval_size]
    metrics, _ = score_recall(inj, examples, f"recall at step {inj.step}")
    log.info("recall at step %d on %d facts: contains %.1f%%, exact match %.1f%%",
             inj.step, len(examples), 100 * metrics["contains"], 100 * metrics["em"])
    return {"recall_contains": metrics["contains"], "recall_em": metrics["em"], "recall_count": len(examples)}


def run_steps(inj: Injector, metrics_log, checkpoint: Path, stop: svf.GracefulStop) -> None:
    cfg = inj.cfg
    bar = tqdm(total=inj.total_steps, initial=inj.step, desc=f"inject {cfg.method}", unit="step")
    while inj.step < inj.total_steps and not stop.requested:
        metrics = train_step(inj)
        inj.epoch_elapsed += metrics["ms"] / 1000
        if inj.step % inj.steps_per_epoch == 0:
            inj.epoch_seconds.append(inj.epoch_elapsed)
            log.info("epoch %d done in %.1f s", len(inj.epoch_seconds), inj.epoch_elapsed)
            inj.epoch_elapsed = 0.0
        if inj.step % cfg.log_every == 0 or inj.step == inj.total_steps:
            log.info("step %d/%d | epoch %.2f | loss %.4f | ce %.4f | penalty %.3e | grad %.3f | %.0f ms",
                     inj.step, inj.total_steps, metrics["epoch"], metrics["loss"], metrics["ce"], metrics["penalty"],
                     metrics["grad_norm"], metrics["ms"])
        if cfg.eval_every and inj.step % cfg.eval_every == 0:
            metrics.update(recall_check(inj))
        metrics_log.write(json.dumps(metrics) + "\n")
        metrics_log.flush()
        if inj.step % cfg.save_every == 0:
            save_checkpoint(inj, checkpoint)
        bar.update(1)
    bar.close()


def save_checkpoint(inj: Injector, path: Path) -> None:
    M.torch_save_atomic(inj.state_dict(), path)


# ---------------------------------------------------------------------------
# Outputs


def adapter_tensors(lora: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """Return the effective factors by key, so W + (alpha / rank) B A reproduces every method's update."""
    tensors = {}
    with torch.no_grad():
        for name, module in lora.items():
            B, A = module.factors()
            tensors[f"{name}.lora_A"] = A.float()
            tensors[f"{name}.lora_B"] = B.float()
    return tensors


def save_adapter(inj: Injector, path: Path, provenance: dict) -> None:
    cfg = inj.cfg
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in inj.lora))
    metadata = {
        "rank": str(cfg.rank), "alpha": str(cfg.alpha), "target_modules": json.dumps(kinds), "method": cfg.method,
        "base_model": cfg.model, "base_fingerprint": provenance["base_fingerprint"], "phrasing": cfg.phrasing,
        "probe_sha256": provenance["probe_sha256"], "expert_sha256": provenance["expert_sha256"],
        "facts_sha256": provenance["facts_sha256"], "facts_ids_sha256": provenance["facts_ids_sha256"],
        "facts": str(cfg.facts), "data_seed": str(cfg.data_seed), "seed": str(cfg.seed), "lam": str(cfg.lam),
        "steps": str(inj.step), "hyperparameters": json.dumps(asdict(cfg)),
        "protected_set": json.dumps(provenance["protected_set"]),
    }
    M.save_safetensors(adapter_tensors(inj.lora), path, metadata)


@contextlib.contextmanager
def plain_linears(inj: Injector):
    """Put each wrapped nn.Linear back in the model, holding W + dW, for the duration of the block."""
    with merged(inj.lora):
        for name, module in inj.lora.items():
            parent, _, child = name.rpartition(".")
            setattr(inj.model.get_submodule(parent), child, module.base)
        try:
            yield inj.model
        finally:
            for name, module in inj.lora.items():
                parent, _, child = name.rpartition(".")
                setattr(inj.model.get_submodule(parent), child, module)


def export_hf(inj: Injector, folder: Path, provenance: dict) -> None:
    """Write a Hugging Face folder: the base folder's config and tokenizer files, and merged model.safetensors.

    The weights are the expert's plus the adapter's update, in the run's
    dtype. A tied lm_head shares embed_tokens' parameter, which
    named_parameters lists once, so the export stays tied.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json", ".bin"))
             and p.name != "model.safetensors"]
    if stale:
        raise ValueError(f"{folder} already contains other weight files ({', '.join(stale)}); choose an empty folder")
    source = Path(inj.model.folder)
    for path in sorted(source.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in EXPORT_FILES):
            tmp = folder / f".{path.name}.tmp-{os.getpid()}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, folder / path.name)
    with plain_linears(inj) as model:
        tensors = dict(model.named_parameters())
        metadata = {"format": "pt", "method": inj.cfg.method, "expert_sha256": provenance["expert_sha256"],
                    "base_fingerprint": provenance["base_fingerprint"]}
        M.save_safetensors(tensors, folder / "model.safetensors", metadata)
    log.info("wrote the merged model to %s (%d tensors)", folder, len(tensors))


def finish(inj: Injector, out: Path, provenance: dict) -> dict:
    """Write the adapter, score the residuals and the final recall; return the summary."""
    cfg = inj.cfg
    adapter = out / "adapter.safetensors"
    save_adapter(inj, adapter, provenance)
    residuals = protected_residuals(inj.lora, inj.protected) if inj.protected else None
    if residuals:
        log.info("residuals on S (mean over %d matrices): %s", len(residuals["per_matrix"]),
                 ", ".join(f"{RESIDUALS[k]} = {v:.3e}" for k, v in residuals["mean"].items() if v is not None))
    recall = None
    if cfg.final_recall:
        recall, records = score_recall(inj, inj.facts, "final recall")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        M.write_text_atomic(out / "recall.predictions.jsonl", lines)
        log.info("final recall on %d facts: contains %.1f%%, exact match %.1f%%, %.1f%% hit the token limit",
                 recall["count"], 100 * recall["contains"], 100 * recall["em"], 100 * recall["truncated"])
    return {
        "method": cfg.method, "phrasing": cfg.phrasing, "facts": cfg.facts, "steps": inj.step,
        "epochs": len(inj.epoch_seconds), "seconds_per_epoch": inj.epoch_seconds,
        "mean_seconds_per_epoch": statistics.mean(inj.epoch_seconds) if inj.epoch_seconds else None,
        "recall": recall, "recall_at_step_0": inj.base_recall, "residuals": residuals,
        "adapter": str(adapter), "adapter_sha256": file_sha256(adapter), "provenance": provenance,
        "config": asdict(cfg),
    }


def train(cfg: InjectConfig) -> Path:
    """Run (or resume) one injection; return the path of summary.json."""
    out = Path(cfg.out)
    inj, provenance = build_injector(cfg)
    out.mkdir(parents=True, exist_ok=True)  # after every input check, so bad input leaves no folder
    checkpoint, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if checkpoint.is_file():
        inj.load_state_dict(torch.load(checkpoint, weights_only=False), checkpoint)
        log.info("resumed from %s at step %d", checkpoint, inj.step)
    svf.truncate_log(log_path, inj.step if checkpoint.is_file() else -1)  # drop lines the checkpoint does not cover
    log.info("config %s", json.dumps(asdict(cfg)))
    log.info("%d trainable values in %d LoRA modules; %d facts, %d steps per epoch, %d protected matrices",
             sum(p.numel() for p in inj.parameters()), len(inj.lora), len(inj.facts), inj.steps_per_epoch,
             len(inj.protected))

    with open(log_path, "a") as metrics_log, svf.GracefulStop() as stop:
        if cfg.eval_every and inj.base_recall is None:
            inj.base_recall = recall_check(inj)
            metrics_log.write(json.dumps({"step": 0, **inj.base_recall}) + "\n")
        try:
            run_steps(inj, metrics_log, checkpoint, stop)
        except NonFiniteLoss as e:
            raise SystemExit(
                f"stopped: {e}. {checkpoint} contains the last saved state; "
                "delete the output folder and rerun with a lower --lr"
            )
    save_checkpoint(inj, checkpoint)
    if stop.requested:
        raise SystemExit(f"stopped at step {inj.step}; run the same command again to resume")

    summary = finish(inj, out, provenance)
    summary_path = out / "summary.json"
    M.write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    if cfg.export_hf:
        export_hf(inj, Path(cfg.export_hf), provenance)
    log.info("wrote %s and %s", out / "adapter.safetensors", summary_path)
    return summary_path


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_config(argv)
        torch.manual_seed(cfg.seed)
        train(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad options, data, or files made for another model
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
