"""Stage 2a of PALoRA: choose the singular directions of each MLP weight that injection must protect.

For every target weight W = U diag(s) V^T of the base model (thin SVD, r
components, s in descending order) and the expert's scales z, a rule scores
the r components and the k best form the protected set S:

    svf        |z_i - 1|        how far the expert moved component i (z = 1 is "unchanged")
    svf-sigma  |z_i - 1| * s_i  size of the expert's change along component i:
                                W'(z) - W = U diag(s * (z - 1)) V^T
    top-sigma  s_i * |z_i|      the k largest singular values of the expert's weight
                                W'(z), the subspace that OPLoRA protects
    random     seeded uniform choice, a baseline

Ties go to the component with the larger singular value (lower index).

Output (`--out`, safetensors), per target module name such as `model.layers.0.mlp.gate_proj`:
    {module}.U_S (m, k)  {module}.V_S (n, k)  float32 columns of U and V, in spectrum order
    {module}.indices (k,) int64, ascending  {module}.s_S (k,)  {module}.z_S (k,)
and string metadata: expert, expert_sha256, base_model, base_fingerprint (of the
base MLP weights, as svf.py computes it), k (as given), rule, seed, expert_task.

Beside it, NAME.spectrum.json (and NAME.spectrum.png when matplotlib is
installed) shows where S falls in the spectrum: how many selected components
lie in each decile of rank position, per matrix type and overall, and the
mean |z - 1| of all components in each decile. Decile 1 contains the largest
singular values.

Usage:
    python probe.py --expert runs/svf/expert.safetensors --k 16 --select svf --out runs/probe/svf-k16.safetensors
    python probe.py --expert runs/svf/expert.safetensors --k 0.25 --select top-sigma --out runs/probe/top-q.safetensors
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import model as M
import svf
from evaluate import file_sha256, read_safetensors
from model import option

log = logging.getLogger("palora.probe")

RULES = ("svf", "top-sigma", "svf-sigma", "random")
DECILES = 10
MATRIX_TYPES = ("gate", "up", "down")


# ---------------------------------------------------------------------------
# Selection


def parse_k(text: str) -> int | float:
    """Read --k: an integer is a count of components per matrix, a number in (0, 1] a fraction of the rank."""
    try:
        count = int(text)
    except ValueError:
        count = None
    if count is not None:
        if count < 1:
            raise ValueError(f"--k {text} must be at least 1, or a fraction in (0, 1] such as 0.25")
        return count
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"--k {text!r} is neither an integer nor a fraction; pass e.g. 16 or 0.25") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"--k {text} as a fraction of the rank must lie in (0, 1]; pass e.g. 0.25")
    return fraction


def components_per_matrix(k: int | float, rank: int, module: str) -> int:
    """Return the number of components to select from a matrix of this rank (at least 1 for a fraction)."""
    if isinstance(k, float):
        return max(1, round(k * rank))
    if k > rank:
        raise ValueError(f"k = {k} exceeds the rank {rank} of {module}; choose k <= {rank} or a fraction such as 0.25")
    return k


def component_scores(rule: str, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Score each component for the deterministic rules; higher is protected first."""
    if rule == "svf":
        return (z - 1).abs()
    if rule == "svf-sigma":
        return (z - 1).abs() * s
    if rule == "top-sigma":
        return s * z.abs()
    raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")


def select_indices(z: torch.Tensor, s: torch.Tensor, k: int | float, rule: str, seed: int, module: str) -> torch.Tensor:
    """Return the protected component indices of one matrix, ascending (int64, on the CPU)."""
    rank = s.shape[0]
    count = components_per_matrix(k, rank, module)
    if rule == "random":
        # One generator per module, keyed by its name, so the choice does not depend on module order.
        chosen = random.Random(f"probe:{seed}:{module}").sample(range(rank), count)
        return torch.tensor(sorted(chosen), dtype=torch.int64)
    scores = component_scores(rule, z.float().cpu(), s.float().cpu())
    # A stable sort breaks ties by index, which is the larger singular value.
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:count].sort().values


def check_expert_fits(z_by_name: dict, svd: dict, path) -> None:
    """Raise ValueError when an expert's modules or z shapes do not match the model's SVD."""
    if not z_by_name:
        raise ValueError(f"{path} contains no z tensors; an expert file has one per MLP matrix")
    for name, z in z_by_name.items():
        if name not in svd:
            raise ValueError(
                f"{path} names module {name!r}, which is not an MLP projection of this model; "
                "the expert was trained on another model"
            )
        U, s, V = svd[name]
        if tuple(z.shape) != tuple(s.shape):
            raise ValueError(
                f"{path}: z for {name} has shape {tuple(z.shape)}, but this model's weight there is "
                f"{U.shape[0]}x{V.shape[0]} with {s.shape[0]} singular values, so z needs shape {tuple(s.shape)}; "
                "the expert was trained on another model"
            )


def check_fingerprint(metadata: dict, fingerprint: str, path) -> None:
    """Raise ValueError when a file records base weights other than the loaded model's."""
    recorded = metadata.get("base_fingerprint")
    if recorded is None:
        log.warning("%s records no base_fingerprint; it cannot be checked against the model", path)
    elif recorded != fingerprint:
        raise ValueError(
            f"{path} was made from base weights {recorded[:12]}, but the loaded model's MLP weights are "
            f"{fingerprint[:12]}; pass the --model it was made from, loaded with the same --dtype "
            "(the fingerprint hashes the weights as loaded)"
        )


def build_probe(z_by_name: dict, svd: dict, k: int | float, rule: str, seed: int) -> dict[str, torch.Tensor]:
    """Return the probe tensors (U_S, V_S, indices, s_S, z_S per module), on the CPU."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")
    tensors = {}
    for name, z in z_by_name.items():
        U, s, V = (t.float().cpu() for t in svd[name])
        z = z.float().cpu()
        idx = select_indices(z, s, k, rule, seed, name)
        tensors[f"{name}.U_S"] = U[:, idx].contiguous()  # (m, k)
        tensors[f"{name}.V_S"] = V[:, idx].contiguous()  # (n, k)
        tensors[f"{name}.indices"] = idx
        tensors[f"{name}.s_S"] = s[idx].contiguous()
        tensors[f"{name}.z_S"] = z[idx].contiguous()
    return tensors


# ---------------------------------------------------------------------------
# Where the selection falls in the spectrum


def matrix_type(module: str) -> str:
    """Return "gate", "up" or "down" for an MLP projection name."""
    return module.rsplit(".", 1)[-1].removesuffix("_proj")


def spectrum_report(selection: dict[str, torch.Tensor], z_by_name: dict) -> dict:
    """Count selected components per decile of rank position, and average |z - 1| per decile.

    Decile d (0-based) contains positions i with floor(10 i / r) = d, so decile 0
    has the largest singular values. `mean_abs_shift` averages over every
    component of the decile, selected or not.
    """
    groups = (*MATRIX_TYPES, "all")
    counts = {g: [0] * DECILES for g in groups}
    shift_sum = {g: [0.0] * DECILES for g in groups}
    shift_n = {g: [0] * DECILES for g in groups}
    for name, idx in selection.items():
        z = z_by_name[name].float().cpu()
        rank = z.shape[0]
        decile_of = torch.arange(rank) * DECILES // rank  # (r,)
        shift = (z - 1).abs()
        for group in (matrix_type(name), "all"):
            for d in decile_of[idx].tolist():
                counts[group][d] += 1
            for d in range(DECILES):
                in_decile = decile_of == d
                shift_sum[group][d] += shift[in_decile].sum().item()
                shift_n[group][d] += int(in_decile.sum())

    report = {"deciles": DECILES, "groups": {}}
    for g in groups:
        total = sum(counts[g])
        if total == 0:
            continue
        report["groups"][g] = {
            "selected": counts[g],
            "selected_fraction": [c / total for c in counts[g]],
            "mean_abs_shift": [s / n if n else None for s, n in zip(shift_sum[g], shift_n[g])],
        }
    return report


def format_report(report: dict) -> str:
    """Render the spectrum report as a fixed-width table, one row per group and quantity."""
    header = "decile (1 = largest s)  " + " ".join(f"{d + 1:>8d}" for d in range(report["deciles"]))
    lines = [header]
    for group, values in report["groups"].items():
        lines.append(f"{group + ' selected':<24}" + " ".join(f"{c:>8d}" for c in values["selected"]))
        shifts = ("       -" if v is None else f"{v:>8.2e}" for v in values["mean_abs_shift"])
        lines.append(f"{group + ' mean |z-1|':<24}" + " ".join(shifts))
    return "\n".join(lines)


def save_plot(report: dict, path: Path, title: str) -> bool:
    """Draw the per-decile histograms as a PNG; return False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the plot %s (the JSON report has the same numbers)", path)
        return False
    groups = report["groups"]
    figure, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3), sharey=True, squeeze=False)
    for ax, (group, values) in zip(axes[0], groups.items()):
        ax.bar(range(1, report["deciles"] + 1), values["selected_fraction"])
        ax.set_title(group)
        ax.set_xlabel("decile of rank position")
    figure.axes[0].set_ylabel("fraction of selected components")
    figure.suptitle(title)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return True


# ---------------------------------------------------------------------------
# Reading probe files


@dataclass
class Probe:
    """A probe file's protected bases and indices by module name, and its metadata."""

    path: Path
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (U_S (m, k), V_S (n, k))
    indices: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


def load_probe(path) -> Probe:
    """Read a probe file written by this script; raise ValueError on a file of another format."""
    tensors, metadata = read_safetensors(path)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    bases, indices = {}, {}
    for name in names:
        missing = [part for part in ("U_S", "V_S", "indices") if f"{name}.{part}" not in tensors]
        if missing:
            raise ValueError(f"{path} lacks {name}.{missing[0]}; it is not a probe file written by probe.py")
        U_S, V_S = tensors[f"{name}.U_S"], tensors[f"{name}.V_S"]
        if U_S.shape[1] != V_S.shape[1]:
            raise ValueError(f"{path}: {name}.U_S has shape {tuple(U_S.shape)} but V_S {tuple(V_S.shape)}; k differs")
        bases[name] = (U_S.float(), V_S.float())
        indices[name] = tensors[f"{name}.indices"]
    if not bases:
        raise ValueError(f"{path} contains no protected bases; it is not a probe file written by probe.py")
    return Probe(Path(path), bases, indices, metadata, file_sha256(path))


# ---------------------------------------------------------------------------
# Command line


@dataclass
class ProbeConfig:
    expert: str | None = option(None, "SVF expert (z) safetensors file written by svf.py (required)")
    model: str | None = option(None, "base model folder or name (default: the expert's base_model metadata)")
    k: str = option("16", "components per matrix: an integer count, or a fraction of the rank in (0, 1]")
    select: str = option("svf", "selection rule: " + ", ".join(RULES))
    seed: int = option(0, "seed of the random rule")
    out: str = option("runs/probe/probe.safetensors", "probe file; NAME.spectrum.json and .png go beside it")
    svd_cache: str | None = option(None, "SVD cache file (default: inside $PALORA_CACHE or ~/.cache/palora)")
    device: str = option("auto", "device for the SVD when it is not cached: cuda, cpu or auto")
    dtype: str | None = option(None, "model dtype: float32, bfloat16 or float16 (default: the one svf.py used)")


def validate_config(cfg: ProbeConfig) -> int | float:
    if not cfg.expert:
        raise ValueError("--expert is required: the z file that svf.py wrote")
    if cfg.select not in RULES:
        raise ValueError(f"--select {cfg.select!r} is not a rule; choose one of {', '.join(RULES)}")
    return parse_k(cfg.k)


def run_probe(cfg: ProbeConfig) -> Path:
    """Select the protected set, write the probe file and its spectrum report; return the probe path."""
    k = validate_config(cfg)
    z_by_name, expert_metadata = read_safetensors(cfg.expert)
    model_name = cfg.model or expert_metadata.get("base_model") or M.DEFAULT_MODEL
    # The expert's fingerprint hashes the weights as svf.py loaded them, so load them the same way.
    dtype = cfg.dtype or json.loads(expert_metadata.get("hyperparameters", "{}")).get("dtype", "float32")
    model, _ = M.load_model(model_name, dtype=M.resolve_dtype(dtype), device=M.resolve_device(cfg.device))
    fingerprint = svf.weights_fingerprint(svf.target_modules(model))
    svd = svf.load_or_compute_svd(model, Path(cfg.svd_cache) if cfg.svd_cache else svf.default_svd_cache(model))
    check_expert_fits(z_by_name, svd, cfg.expert)
    check_fingerprint(expert_metadata, fingerprint, cfg.expert)

    if cfg.select in ("svf", "svf-sigma") and all(bool((z == 1).all()) for z in z_by_name.values()):
        log.warning("every z in %s equals 1, so the expert never moved and the %s rule "
                    "falls back to ranking by singular value", cfg.expert, cfg.select)
    tensors = build_probe(z_by_name, svd, k, cfg.select, cfg.seed)
    out = Path(cfg.out)
    metadata = {
        "expert": str(cfg.expert), "expert_sha256": file_sha256(cfg.expert),
        "expert_task": expert_metadata.get("task", ""),
        "base_model": model_name, "base_fingerprint": fingerprint, "k": cfg.k, "rule": cfg.select,
        "seed": str(cfg.seed), "config": json.dumps(asdict(cfg)),
    }
    M.save_safetensors(tensors, out, metadata)

    selection = {name: tensors[f"{name}.indices"] for name in z_by_name}
    report = spectrum_report(selection, z_by_name)
    report.update(rule=cfg.select, k=cfg.k, expert=str(cfg.expert), probe=str(out))
    stem = out.name.removesuffix(".safetensors")
    M.write_text_atomic(out.with_name(f"{stem}.spectrum.json"), json.dumps(report, indent=2) + "\n")
    save_plot(report, out.with_name(f"{stem}.spectrum.png"), f"rule {cfg.select}, k = {cfg.k}")
    print(format_report(report))
    total = sum(len(i) for i in selection.values())
    log.info("wrote %s: %d components over %d matrices (rule %s, k %s)", out, total, len(selection), cfg.select, cfg.k)
    return out


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    cfg = ProbeConfig(**vars(M.config_parser(ProbeConfig, __doc__).parse_args(argv)))
    try:
        run_probe(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad options, or files from another model
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
