"""Stage 1 of PALoRA: train a Singular Value Fine-Tuning (SVF) expert with REINFORCE.

Every MLP weight W = U diag(s) V^T (thin SVD, r = min(m, n) components)
gets one trainable vector z of length r, and the expert uses

    W'(z) = U diag(s * z) V^T = W + U diag(s * (z - 1)) V^T.

The second form is what the code computes: at z = 1 the update is exactly
zero, so the untrained expert reproduces the base model bit for bit. z is
the scale itself, not sigmoid(p) as in Transformer-Squared, so "how far the
expert moved component i" is simply |z_i - 1|, which is what probe.py ranks.

Usage:
    python svf.py --model smollm2-135m-instruct --task basic_arithmetic --out runs/svf-arith
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

import model as M
from model import option
import tasks

log = logging.getLogger("palora.svf")

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SKILL_TASKS = tasks.SKILL_TASKS


def target_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Return every MLP projection by its Hugging Face module name, in layer order."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in MLP_PROJECTIONS and ".mlp." in name and isinstance(module, nn.Linear)
    }


# ---------------------------------------------------------------------------
# SVD cache


def weights_fingerprint(modules: dict[str, nn.Linear]) -> str:
    """Hash the target weights, so a cached SVD or an expert is never used with another checkpoint."""
    # NOTE: the hash covers the weights as loaded, so one checkpoint loaded in
    # float32 and in bfloat16 has two fingerprints: make the expert, the probe
    # and the adapter with one --dtype.
    h = hashlib.sha256()
    for name, module in modules.items():
        h.update(name.encode())
        h.update(module.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def compute_svd(modules: dict[str, nn.Linear]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Return {name: (U (m, r), s (r,), V (n, r))} for each weight, in float32."""
    svd = {}
    for name, module in tqdm(modules.items(), desc="SVD", unit="matrix"):
        U, s, Vh = torch.linalg.svd(module.weight.detach().float(), full_matrices=False)
        svd[name] = (U.contiguous(), s, Vh.T.contiguous())
    return svd


def load_or_compute_svd(model: nn.Module, cache_path: Path):
    """Read the SVD of every target weight from `cache_path`, or compute and write it.

    The file records a fingerprint of the weights; a cache made from another
    checkpoint is recomputed and replaced.
    """
    modules = target_modules(model)
    fingerprint = weights_fingerprint(modules)
    if cache_path.is_file():
        with safe_open(str(cache_path), framework="pt") as f:
            if f.metadata().get("fingerprint") == fingerprint:
                device = next(iter(modules.values())).weight.device
                return {n: tuple(f.get_tensor(f"{n}.{k}").to(device) for k in "UsV") for n in modules}
        log.info("SVD cache %s was made from other weights; recomputing", cache_path)
    svd = compute_svd(modules)
    tensors = {f"{n}.{k}": t.cpu() for n, usv in svd.items() for k, t in zip("UsV", usv)}
    M.save_safetensors(tensors, cache_path, {"fingerprint": fingerprint})
    return svd


# ---------------------------------------------------------------------------
# The SVF parametrization


class SVFLinear(nn.Module):
    """A frozen nn.Linear whose weight is rebuilt from trainable singular-value scales z.

    `rebuild()` computes W'(z) once; forward uses it until the next rebuild.
    Inside `use_base()` forward runs on the original W instead.
    """

    def __init__(self, base: nn.Linear, U, s, V):
        super().__init__()
        self.base = base
        self.register_buffer("U", U, persistent=False)  # (m, r)
        self.register_buffer("s", s, persistent=False)  # (r,)
        self.register_buffer("V", V, persistent=False)  # (n, r)
        self.z = nn.Parameter(torch.ones_like(s))
        self.rebuilt: torch.Tensor | None = None
        self.base_mode = False

    def rebuild(self):
        # (U * c) @ V.T scales U's columns; diag(c) is never built.
        delta = (self.U * (self.s * (self.z - 1))) @ self.V.T  # (m, n)
        self.rebuilt = (self.base.weight.float() + delta).to(self.base.weight.dtype)

    def forward(self, x):
        if self.rebuilt is None:
            raise RuntimeError("SVFLinear.rebuild() must run before forward")
        weight = self.base.weight if self.base_mode else self.rebuilt
        return F.linear(x, weight, self.base.bias)


def attach_svf(model: nn.Module, svd) -> dict[str, SVFLinear]:
    """Replace each target nn.Linear by an SVFLinear; return them by module name."""
    wrapped = {}
    for name, module in target_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        U, s, V = svd[name]
        wrapped[name] = SVFLinear(module, U, s, V)
        setattr(model.get_submodule(parent_name), child, wrapped[name])
    return wrapped


def rebuild_all(svf_modules: dict[str, SVFLinear]) -> None:
    for module in svf_modules.values():
        module.rebuild()


@contextlib.contextmanager
def use_base(svf_modules: dict[str, SVFLinear]):
    for module in svf_modules.values():
        module.base_mode = True
    try:
        yield
    finally:
        for module in svf_modules.values():
            module.base_mode = False


def merge_expert(model: nn.Module, z: dict[str, torch.Tensor], svd) -> None:
    """Write W'(z) = W + U diag(s * (z - 1)) V^T into each named nn.Linear in place.

    The caller checks names and shapes (evaluate.apply_expert does). A matrix
    whose z is all ones is skipped, so it stays bit-identical: adding a zero
    update would turn a weight of -0.0 into +0.0.
    """
    modules = dict(model.named_modules())
    for name, scale in z.items():
        weight = modules[name].weight
        scale = scale.to(device=weight.device, dtype=torch.float32)
        if bool((scale == 1).all()):
            continue
        U, s, V = (t.to(device=weight.device, dtype=torch.float32) for t in svd[name])
        with torch.no_grad():
            delta = (U * (s * (scale - 1))) @ V.T  # (m, n); diag(s * (z - 1)) is never built
            weight.copy_((weight.float() + delta).to(weight.dtype))


# ---------------------------------------------------------------------------
# Configuration


@dataclass
class SVFConfig:
    model: str = option("smollm2-135m-instruct", "model folder, hub id, or smollm2-135m-instruct")
    task: str = option("basic_arithmetic", "skill task: " + ", ".join(SKILL_TASKS))
    out: str = option("runs/svf", "output folder: expert.safetensors, checkpoint.pt, log.jsonl")
    data_dir: str | None = option(None, "folder of local data files (default: $PALORA_DATA_DIR)")
    hub: bool = option(False, tasks.HUB_HELP)
    steps: int = option(40, "optimizer steps")
    batch_size: int = option(32, "rollouts (prompts) per step")
    lr: float = option(2e-3, "Adam learning rate for z")
    kl_coef: float = option(0.0, "weight of the KL penalty to the base model on sampled tokens (0 to 0.3)")
    clip: float = option(1.0, "gradient-norm clipping threshold")
    temperature: float = option(1.0, "rollout sampling temperature; 0 means greedy rollouts")
    top_p: float = option(1.0, "rollout nucleus sampling mass")
    baseline: str = option("mean", "'mean' subtracts the batch mean reward; 'none' uses raw +1/-1")
    max_new_tokens: int | None = option(None, "rollout length limit in tokens (default: the task's)")
    eval_every: int = option(10, "validation interval in steps")
    eval_size: int = option(200, "validation items per evaluation")
    eval_batch_size: int = option(32, "generation batch size during validation")
    save_every: int = option(5, "checkpoint interval in steps")
    seed: int = option(0, "seed for data splits, prompt sampling and rollouts")
    dtype: str = option("float32", "model dtype: float32, bfloat16 or float16")
    device: str = option("auto", "cuda, cpu or auto (cuda when available)")
    svd_cache: str | None = option(None, "SVD cache file (default: inside $PALORA_CACHE or ~/.cache/palora)")


def parse_config(argv=None) -> SVFConfig:
    parser = M.config_parser(SVFConfig, __doc__)
    cfg = SVFConfig(**vars(parser.parse_args(argv)))
    validate_config(cfg)
    return cfg


def validate_config(cfg: SVFConfig) -> None:
    tasks.get_task(cfg.task)  # raises with the list of known tasks
    if cfg.task not in SKILL_TASKS:
        raise ValueError(f"--task {cfg.task!r} is not a skill task; choose one of {', '.join(SKILL_TASKS)}")
    if cfg.baseline not in ("mean", "none"):
        raise ValueError(f"--baseline must be 'mean' or 'none', got {cfg.baseline!r}")
    for name in ("steps", "batch_size", "eval_every", "eval_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.kl_coef < 0 or cfg.lr <= 0:
        raise ValueError(f"--kl-coef must be >= 0 and --lr > 0, got {cfg.kl_coef} and {cfg.lr}")


# ---------------------------------------------------------------------------
# Training


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Trainer:
    """Everything one REINFORCE run needs; `state_dict` is what a checkpoint holds."""

    cfg: SVFConfig
    model: M.CausalLM
    tokenizer: object
    task: object
    splits: object
    svf_modules: dict[str, SVFLinear]
    optimizer: torch.optim.Optimizer
    fingerprint: str
    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    best_z: dict | None = None
    base_score: float | None = None

    def __post_init__(self):
        self.rng = random.Random(self.cfg.seed)
        self.generator = torch.Generator(device=self.model.lm_head.weight.device).manual_seed(self.cfg.seed)

    def z(self) -> dict[str, torch.Tensor]:
        return {name: m.z.detach().clone() for name, m in self.svf_modules.items()}

    def state_dict(self) -> dict:
        return {
            "z": self.z(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "best_score": self.best_score, "best_step": self.best_step, "best_z": self.best_z,
            "base_score": self.base_score,
            "python_rng": self.rng.getstate(), "torch_rng": self.generator.get_state(),
            "task": self.cfg.task, "fingerprint": self.fingerprint, "model": self.cfg.model,
        }

    def load_state_dict(self, state: dict, source: Path) -> None:
        if state["fingerprint"] != self.fingerprint or state["task"] != self.cfg.task:
            raise ValueError(
                f"checkpoint {source} was made for task {state['task']!r} on model {state['model']!r} "
                f"(weights {state['fingerprint'][:12]}), not task {self.cfg.task!r} on {self.cfg.model!r} "
                f"(weights {self.fingerprint[:12]}); pass another --out or delete the checkpoint"
            )
        with torch.no_grad():
            for name, m in self.svf_modules.items():
                m.z.copy_(state["z"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best_score, self.best_step = state["step"], state["best_score"], state["best_step"]
        self.best_z, self.base_score = state["best_z"], state["base_score"]
        self.rng.setstate(state["python_rng"])
        self.generator.set_state(state["torch_rng"])


def rollout_loss(trainer: Trainer, examples, generations, rewards):
    """Return the REINFORCE loss and the mean KL estimate for one batch of rollouts.

    loss = -mean_i A_i * sum_t log p_z(y_it) + kl_coef * KL, where A_i is the
    reward minus the batch mean (cfg.baseline == "mean") or the raw reward.
    """
    cfg = trainer.cfg
    prompt_ids = [g.prompt_ids for g in generations]
    completion_ids = [g.token_ids for g in generations]
    logprobs, mask = M.completion_logprobs(trainer.model, prompt_ids, completion_ids)  # (B, C)
    advantages = rewards - rewards.mean() if cfg.baseline == "mean" else rewards
    loss = -(advantages * (logprobs * mask).sum(1)).mean()

    kl = torch.zeros((), device=logprobs.device)
    if cfg.kl_coef > 0:
        with torch.no_grad(), use_base(trainer.svf_modules):
            base_logprobs, _ = M.completion_logprobs(trainer.model, prompt_ids, completion_ids)
        # k3 estimator on the sampled tokens: exp(d) - d - 1 with d = log p_base - log p_z.
        # It is non-negative and unbiased for KL(p_z || p_base).
        d = base_logprobs - logprobs
        kl = ((d.exp() - d - 1) * mask).sum() / mask.sum()
        loss = loss + cfg.kl_coef * kl
    return loss, kl


def train_step(trainer: Trainer) -> dict:
    cfg = trainer.cfg
    examples = trainer.rng.sample(trainer.splits.train, min(cfg.batch_size, len(trainer.splits.train)))
    t0 = time.perf_counter()
    rebuild_all(trainer.svf_modules)  # W'(z) with a graph back to z; reused until the next step
    t_rebuild = time.perf_counter()

    prompts = [tasks.build_prompt(trainer.tokenizer, ex) for ex in examples]
    generations = M.generate(
        trainer.model, trainer.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens or trainer.task.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, generator=trainer.generator,
    )
    correct = [trainer.task.score(ex, g.text)["correct"] for ex, g in zip(examples, generations)]
    rewards = torch.tensor([1.0 if c else -1.0 for c in correct], device=trainer.model.lm_head.weight.device)
    t_rollout = time.perf_counter()

    params = [m.z for m in trainer.svf_modules.values()]
    trainer.optimizer.zero_grad(set_to_none=True)
    if cfg.baseline == "mean" and cfg.kl_coef == 0 and bool((rewards == rewards[0]).all()):
        # Equal rewards give zero advantages, so the loss and its gradient are exactly
        # zero: skip the forward and backward passes. Adam still steps on its momentum.
        loss, kl = torch.zeros(()), torch.zeros(())
        for p in params:
            p.grad = torch.zeros_like(p)
    else:
        loss, kl = rollout_loss(trainer, examples, generations, rewards)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {trainer.step + 1}")
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at step {trainer.step + 1}")
    trainer.optimizer.step()
    t_end = time.perf_counter()

    trainer.step += 1
    return {
        "step": trainer.step, "reward": rewards.mean().item(), "accuracy": sum(correct) / len(correct),
        "loss": loss.item(), "kl": kl.item(), "grad_norm": grad_norm.item(),
        "truncated": sum(g.finish_reason == "length" for g in generations) / len(generations),
        "ms": 1000 * (t_end - t0), "ms_rebuild": 1000 * (t_rebuild - t0),
        "ms_rollout": 1000 * (t_rollout - t_rebuild), "ms_forward_backward": 1000 * (t_end - t_rollout),
    }


@torch.no_grad()
def validate(trainer: Trainer) -> float:
    """Return greedy accuracy on the validation split with the current z."""
    from evaluate import evaluate_examples

    rebuild_all(trainer.svf_modules)
    examples = trainer.splits.validation[: trainer.cfg.eval_size]
    metrics, _ = evaluate_examples(
        trainer.model, trainer.tokenizer, trainer.task, examples, batch_size=trainer.cfg.eval_batch_size,
        desc=f"validation at step {trainer.step}",
    )
    return metrics["accuracy"]


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    M.torch_save_atomic(trainer.state_dict(), path)


def save_expert(trainer: Trainer, path: Path) -> None:
    """Write the best z (the current z if no validation ran yet) with the run's metadata."""
    z = trainer.best_z if trainer.best_z is not None else trainer.z()
    metadata = {
        "base_model": trainer.cfg.model, "base_fingerprint": trainer.fingerprint, "task": trainer.cfg.task,
        "steps": str(trainer.step), "best_step": str(trainer.best_step),
        "best_validation_score": json.dumps(trainer.best_score if math.isfinite(trainer.best_score) else None),
        "base_validation_score": json.dumps(trainer.base_score), "seed": str(trainer.cfg.seed),
        "splits": json.dumps(trainer.splits.describe()), "hyperparameters": json.dumps(asdict(trainer.cfg)),
        "parametrization": "W' = U diag(s * z) V^T, z initialized to 1",
    }
    M.save_safetensors(z, path, metadata)


def build_trainer(cfg: SVFConfig) -> Trainer:
    device, dtype = M.resolve_device(cfg.device), M.resolve_dtype(cfg.dtype)
    model, tokenizer = M.load_model(cfg.model, dtype=dtype, device=device)
    task = tasks.get_task(cfg.task)
    splits = tasks.load_splits(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed, hub=cfg.hub)
    cache = Path(cfg.svd_cache) if cfg.svd_cache else default_svd_cache(model)
    svd = load_or_compute_svd(model, cache)
    fingerprint = weights_fingerprint(target_modules(model))
    svf_modules = attach_svf(model, svd)
    optimizer = torch.optim.Adam([m.z for m in svf_modules.values()], lr=cfg.lr)
    return Trainer(cfg, model, tokenizer, task, splits, svf_modules, optimizer, fingerprint)


def default_svd_cache(model: M.CausalLM) -> Path:
    fingerprint = weights_fingerprint(target_modules(model))
    return M.cache_dir() / "svd" / f"{fingerprint[:16]}.safetensors"


def train(cfg: SVFConfig) -> Path:
    out = Path(cfg.out)
    trainer = build_trainer(cfg)
    out.mkdir(parents=True, exist_ok=True)  # after every input check, so bad input leaves no folder
    checkpoint, expert_path, log_path = out / "checkpoint.pt", out / "expert.safetensors", out / "log.jsonl"
    if checkpoint.is_file():
        trainer.load_state_dict(torch.load(checkpoint, weights_only=False), checkpoint)
        truncate_log(log_path, trainer.step)
        log.info("resumed from %s at step %d", checkpoint, trainer.step)
    log.info("config %s", json.dumps(asdict(cfg)))
    log.info("%d trainable z values over %d matrices; splits %s",
             sum(m.z.numel() for m in trainer.svf_modules.values()), len(trainer.svf_modules),
             json.dumps(trainer.splits.describe()))
    if trainer.base_score is None:
        trainer.base_score = validate(trainer)
        log.info("validation at step 0 (base model): %.4f", trainer.base_score)

    with open(log_path, "a") as metrics_log, GracefulStop() as stop:
        try:
            run_steps(trainer, metrics_log, checkpoint, stop)
        except NonFiniteLoss as e:
            save_expert(trainer, expert_path)
            raise SystemExit(f"stopped: {e}; the last good z is in {checkpoint} and {expert_path}")
    save_checkpoint(trainer, checkpoint)
    save_expert(trainer, expert_path)
    if stop.requested:
        raise SystemExit(f"stopped at step {trainer.step}; run the same command again to resume")
    log.info("best validation %.4f at step %d (base %.4f); wrote %s",
             trainer.best_score, trainer.best_step, trainer.base_score, expert_path)
    return expert_path


def run_steps(trainer: Trainer, metrics_log, checkpoint: Path, stop: "GracefulStop") -> None:
    cfg = trainer.cfg
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc=f"SVF {cfg.task}", unit="step")
    while trainer.step < cfg.steps and not stop.requested:
        metrics = train_step(trainer)
        log.info(
            "step %d | reward %+.3f | loss %.4f | kl %.4f | grad %.3f | %.0f ms "
            "(rollout %.0f, fwd/bwd %.0f, rebuild %.0f)",
            metrics["step"], metrics["reward"], metrics["loss"], metrics["kl"], metrics["grad_norm"],
            metrics["ms"], metrics["ms_rollout"], metrics["ms_forward_backward"], metrics["ms_rebuild"],
        )
        if trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps:
            metrics["validation"] = score = validate(trainer)
            if score > trainer.best_score:
                trainer.best_score, trainer.best_step, trainer.best_z = score, trainer.step, trainer.z()
            log.info("validation at step %d: %.4f (best %.4f at step %d)",
                     trainer.step, score, trainer.best_score, trainer.best_step)
        metrics_log.write(json.dumps(metrics) + "\n")
        metrics_log.flush()
        if trainer.step % cfg.save_every == 0:
            save_checkpoint(trainer, checkpoint)
        bar.update(1)
    bar.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past a resumed checkpoint, so every step is logged once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    M.write_text_atomic(path, "".join(line + "\n" for line in lines))


class GracefulStop:
    """Turn the first SIGINT or SIGTERM into a request to stop after the current step.

    The run then checkpoints a consistent state. A second signal interrupts at once.
    """

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after this step; send it again to abort without saving",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_config(argv)
        torch.manual_seed(cfg.seed)
        train(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: CheckpointError and DataError are ValueErrors
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
