"""Score a model on skill tasks and on TriviaQA fact recall, optionally with an SVF expert and a LoRA adapter merged.

Scores:
- skill score: accuracy of greedy answers (GSM8K final number, option letter,
  MBPP pass@1, ...), scored by `tasks.py`;
- recall: greedy answers to the first N TriviaQA facts, the same N that
  inject.py trains on, as exact match ("em") and "contains" against any alias;
- retention (in `--compare`): a run's skill score divided by the SVF expert's.

File formats read here:
- expert (written by svf.py): safetensors with one 1-D float32 tensor z per
  target matrix, keyed by module name (`model.layers.0.mlp.gate_proj`). With
  the thin SVD W = U diag(s) V^T of the base weight, the expert's weight is
  W' = U diag(s * z) V^T. String metadata: base_model, task, steps,
  best_validation_score, seed and hyperparameters (JSON).
- adapter (written by inject.py): safetensors with `{module}.lora_A`
  (rank, in_features) and `{module}.lora_B` (out_features, rank); string
  metadata: rank, alpha, target_modules (JSON list), method, base_model.
  The merged weight is W + (alpha / rank) B A.

Usage:
    python evaluate.py --model smollm2-135m-instruct --tasks basic_arithmetic --recall 250 \\
        --expert runs/svf/expert.safetensors --out results/expert.json
    python evaluate.py --compare results/base.json results/expert.json results/lora.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import model as M
import svf
import tasks

# EvalConfig's field `tasks` hides the module inside the class body.
from tasks import HUB_HELP

log = logging.getLogger("palora.evaluate")

RECALL = "recall"  # key of the TriviaQA recall scores in a result file
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------
# Generation and scoring


def evaluate_examples(model, tokenizer, task, examples, batch_size=16, max_new_tokens=None, desc=None):
    """Generate greedy answers to `examples` in batches, score them with `task` and return (metrics, records).

    Prompts are sorted by length, longest first, so that batches need little
    padding and the peak memory shows in the first batch. Records keep the
    order of `examples`. `max_new_tokens` defaults to the task's own limit.
    Metrics: `score` (accuracy, or exact match for TriviaQA), every boolean
    flag of the task's score averaged (`accuracy` stands for `correct`),
    `count`, `truncated` (fraction of generations that hit the token limit),
    `elapsed_s` and `items_per_s`.
    """
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples to evaluate. Pass a split that contains items.")
    max_new_tokens = max_new_tokens or task.max_new_tokens
    start = time.perf_counter()

    prompts = [tasks.build_prompt(tokenizer, example) for example in examples]
    prompt_ids = M.encode_prompts(tokenizer, prompts)
    generations = generate_in_length_order(
        model, tokenizer, prompt_ids, batch_size, max_new_tokens, desc or task.name
    )
    completions = [g.text for g in generations]
    scores = task.score_batch(examples, completions)

    records = [
        make_record(example, prompt, generation, score)
        for example, prompt, generation, score in zip(examples, prompts, generations, scores, strict=True)
    ]
    metrics = summarize_records(records)
    metrics["elapsed_s"] = time.perf_counter() - start
    metrics["items_per_s"] = len(records) / metrics["elapsed_s"]
    return metrics, records


# Token budget per batch item: a batch of size b whose longest prompt has L tokens is cut to
# b * TOKENS_PER_BATCH_ITEM // (L + max_new_tokens) sequences, and never below one. So one
# very long prompt (an MBPP test item has 3754 tokens) does not pad a whole batch to its length.
TOKENS_PER_BATCH_ITEM = 1024


def length_batches(lengths: list[int], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Group indices into batches of similar length, longest first, within a token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * TOKENS_PER_BATCH_ITEM
    batches, start = [], 0
    while start < len(order):
        # The first index of a batch is its longest prompt.
        size = max(1, min(batch_size, budget // (lengths[order[start]] + max_new_tokens)))
        batches.append(order[start : start + size])
        start += size
    return batches


def generate_in_length_order(model, tokenizer, prompt_ids, batch_size, max_new_tokens, desc):
    """Run greedy `M.generate` over batches of similar length and return the generations in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generations = [None] * len(prompt_ids)
    batches = length_batches([len(p) for p in prompt_ids], batch_size, max_new_tokens)
    with tqdm(total=len(prompt_ids), desc=desc, unit="item", leave=False) as bar:
        for batch in batches:
            outputs = M.generate(model, tokenizer, [prompt_ids[i] for i in batch], max_new_tokens=max_new_tokens)
            for i, generation in zip(batch, outputs, strict=True):
                generations[i] = generation
            bar.update(len(batch))
    return generations


def make_record(example, prompt, generation, score) -> dict:
    """Build the output of one item: id, prompt, completion, gold answer, the task's score fields and finish_reason."""
    return {
        "id": example.id,
        "prompt": prompt,
        "completion": generation.text,
        "gold": example.answer,
        **score,  # prediction, correct (or em and contains), and task extras such as MBPP's status
        "finish_reason": generation.finish_reason,
        "new_tokens": len(generation.token_ids),
    }


def score_flags(record: dict) -> list[str]:
    """Return the boolean score fields of a record, e.g. ["correct"] or ["em", "contains"]."""
    return [key for key, value in record.items() if isinstance(value, bool)]


def summarize_records(records: list[dict]) -> dict:
    """Average each boolean score field over records, and add score, count and truncated."""
    n = len(records)
    metrics = {}
    for flag in score_flags(records[0]):
        metrics["accuracy" if flag == "correct" else flag] = sum(r[flag] for r in records) / n
    # TriviaQA has no `correct`, so its headline number is exact match.
    headline = "accuracy" if "accuracy" in metrics else "em"
    metrics["score"] = metrics.get(headline)
    metrics["count"] = n
    metrics["truncated"] = sum(r["finish_reason"] == "length" for r in records) / n
    return metrics


# ---------------------------------------------------------------------------
# Experts and adapters


class ModelMismatchError(ValueError):
    """An expert or adapter file whose modules or shapes do not fit the model."""


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the tensors (on the CPU) and the string metadata of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}. Check the path given for the expert or adapter.")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def find_linear(model: nn.Module, name: str, path) -> nn.Linear:
    """Return the nn.Linear called `name`, or raise ModelMismatchError naming the file and the key."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        found = "no such module" if module is None else f"a {type(module).__name__}"
        raise ModelMismatchError(
            f"{path} names module {name!r}, which is {found} in this model. Expected an nn.Linear such as "
            "'model.layers.0.mlp.gate_proj', so the file was made for another model or has another format."
        )
    return module


def check_shape(path, name: str, what: str, found, expected) -> None:
    if tuple(found) != tuple(expected):
        raise ModelMismatchError(
            f"{path}: {what} for module {name!r} has shape {tuple(found)}, but this model expects "
            f"{tuple(expected)}. The file was made for another model."
        )


@torch.no_grad()
def apply_expert(model: nn.Module, path, svd: dict | None = None) -> dict[str, str]:
    """Merge an SVF expert into the model's weights in place and return the file's metadata.

    Each weight W = U diag(s) V^T becomes W + U diag(s * (z - 1)) V^T, computed
    in float32 and written back in W's dtype. A matrix whose z is all ones is
    left untouched, so it stays bit-identical. `svd` maps a module name to
    (U (m, r), s (r,), V (n, r)) of the base weight; without it the SVD comes
    from svf.py's cache. Every key and shape is checked before any weight
    changes.
    """
    z_by_name, metadata = read_safetensors(path)
    if not z_by_name:
        raise ModelMismatchError(f"{path} contains no z tensors. An expert file contains one per target matrix.")
    modules = {}
    for name, z in z_by_name.items():
        module = find_linear(model, name, path)
        check_shape(path, name, "z", z.shape, (min(module.weight.shape),))
        if not bool(torch.isfinite(z).all()):
            raise ModelMismatchError(f"{path}: z for module {name!r} contains NaN or infinite values.")
        if svd is not None and name in svd and tuple(svd[name][1].shape) != tuple(z.shape):
            raise ValueError(
                f"the SVD passed for {name!r} has s of shape {tuple(svd[name][1].shape)}, but z in {path} has "
                f"shape {tuple(z.shape)}. The SVD was computed from another model."
            )
        modules[name] = module

    if svd is None:
        svd = svf.load_or_compute_svd(model, svf.default_svd_cache(model))
    svf.merge_expert(model, z_by_name, svd)
    log.info("merged expert %s into %d matrices (metadata: %s)", path, len(modules), summarize_metadata(metadata))
    return metadata


def adapter_scale(metadata: dict[str, str], path) -> tuple[int, float]:
    """Return (rank, alpha) from an adapter's metadata."""
    try:
        return int(metadata["rank"]), float(metadata["alpha"])
    except KeyError as e:
        raise ModelMismatchError(
            f"{path} lacks the metadata field {e.args[0]!r}. An adapter file records rank and alpha."
        ) from e
    except ValueError as e:
        raise ModelMismatchError(f"{path}: metadata rank and alpha must be numbers ({e}).") from e


def pair_adapter_tensors(tensors: dict[str, torch.Tensor], path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group `{module}.lora_A` and `{module}.lora_B` tensors by module name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module_name, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not module_name:
            raise ModelMismatchError(
                f"{path} contains the unknown key {key!r}. Adapter keys are '<module>.lora_A' and '<module>.lora_B'."
            )
        parts.setdefault(module_name, {})[kind] = tensor
    for module_name, pair in parts.items():
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise ModelMismatchError(f"{path} has no {module_name}.{missing}, but each module needs both factors.")
    if not parts:
        raise ModelMismatchError(f"{path} contains no LoRA factors.")
    return {name: (pair["lora_A"], pair["lora_B"]) for name, pair in parts.items()}


@torch.no_grad()
def apply_adapter(model: nn.Module, path) -> dict[str, str]:
    """Merge a LoRA adapter into the model's weights in place, W += (alpha / rank) B A, and return the metadata.

    The update is computed in float32 and written back in W's dtype. A method
    that transforms the update (a hard projection on each side of B A) stores
    the transformed factors, so this merge is the same for every method.
    Calling it twice adds the update twice. Every key and shape is checked
    before any weight changes.
    """
    tensors, metadata = read_safetensors(path)
    rank, alpha = adapter_scale(metadata, path)
    factors = pair_adapter_tensors(tensors, path)
    modules = {}
    for name, (A, B) in factors.items():
        module = find_linear(model, name, path)
        out_features, in_features = module.weight.shape
        check_shape(path, name, "lora_A", A.shape, (rank, in_features))
        check_shape(path, name, "lora_B", B.shape, (out_features, rank))
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise ModelMismatchError(f"{path}: the factors of module {name!r} contain NaN or infinite values.")
        modules[name] = module

    for name, module in modules.items():
        W = module.weight
        A, B = (t.to(device=W.device, dtype=torch.float32) for t in factors[name])
        W.copy_((W.float() + (alpha / rank) * (B @ A)).to(W.dtype))
    log.info("merged adapter %s into %d matrices (metadata: %s)", path, len(modules), summarize_metadata(metadata))
    return metadata


def summarize_metadata(metadata: dict[str, str], max_chars: int = 80) -> str:
    """Shorten long metadata values (hyperparameters, splits) for a log line."""
    items = (f"{k}={v if len(v) <= max_chars else v[:max_chars] + '...'}" for k, v in sorted(metadata.items()))
    return ", ".join(items)


# ---------------------------------------------------------------------------
# Evaluation run


@dataclass
class EvalConfig:
    model: str = M.option(M.DEFAULT_MODEL, "model folder, hub id or smollm2-135m-instruct")
    expert: str | None = M.option(None, "SVF expert (z) safetensors file to merge first")
    adapter: str | None = M.option(None, "LoRA adapter safetensors file to merge after the expert")
    tasks: str = M.option("", "comma-separated skill tasks, e.g. gsm8k,arc_easy (known: " + ", ".join(tasks.TASKS) + ")")
    recall: int = M.option(0, "number of TriviaQA facts to test recall on, the first N of the facts split (0 skips recall)")
    split: str = M.option("test", "split of the skill tasks: train, validation or test")
    limit: int | None = M.option(None, "evaluate only the first N items of each skill split")
    seed: int = M.option(0, "seed of the data splits and of the facts' order")
    data_dir: str | None = M.option(None, "folder of local data files (default: $PALORA_DATA_DIR)")
    hub: bool = M.option(False, HUB_HELP)
    batch_size: int = M.option(16, "prompts per generation batch")
    max_new_tokens: int | None = M.option(None, "generation limit in tokens for every task (default: each task's own)")
    dtype: str = M.option("float32", "model dtype: float32, bfloat16 or float16")
    device: str = M.option("auto", "cuda, cpu or auto (cuda when available)")
    label: str | None = M.option(None, "run name shown by --compare (default: the result file's stem)")
    out: str | None = M.option(None, "result file, NAME.json; per-item predictions go to NAME.predictions.jsonl")


def parse_task_names(text: str) -> list[str]:
    """Split a comma-separated task list. An unknown name raises ValueError, which lists the known ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        tasks.get_task(name)
        if name not in tasks.SKILL_TASKS:
            raise ValueError(f"--tasks lists {name!r}, which contains the injected facts, not a skill: "
                             "score them with --recall N")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks lists a task twice: {text!r}")
    return names


def validate_config(cfg: EvalConfig) -> None:
    if not cfg.out or not cfg.out.endswith(".json"):
        raise ValueError(f"--out must name a .json result file, got {cfg.out!r}")
    if not parse_task_names(cfg.tasks) and cfg.recall <= 0:
        raise ValueError("nothing to evaluate: pass --tasks, --recall N, or both")
    if cfg.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    for name, minimum in (("recall", 0), ("limit", 1), ("batch_size", 1), ("max_new_tokens", 1)):
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    M.resolve_dtype(cfg.dtype)


@dataclass
class EvalSet:
    """The items of one scored set: a skill task's split, or the recall facts."""

    key: str  # task name, or RECALL
    task: tasks.Task
    examples: list
    description: dict  # Splits.describe() plus the split and the number of items used


def load_eval_sets(cfg: EvalConfig) -> list[EvalSet]:
    """Read every requested data set before the model loads, so data errors show at once."""
    sets = []
    for name in parse_task_names(cfg.tasks):
        splits = tasks.load_splits(name, data_dir=cfg.data_dir, seed=cfg.seed, hub=cfg.hub)
        examples = getattr(splits, cfg.split)[: cfg.limit]  # splits are already in seeded order
        if not examples:
            raise ValueError(
                f"task {name!r} has no items in split {cfg.split!r} (sizes: {splits.describe()['sizes']}). "
                "Choose another --split."
            )
        description = {**splits.describe(), "split": cfg.split, "items": len(examples)}
        sets.append(EvalSet(name, tasks.get_task(name), examples, description))
    if cfg.recall > 0:
        splits = tasks.load_splits("triviaqa", data_dir=cfg.data_dir, seed=cfg.seed, hub=cfg.hub)
        facts = tasks.sample_facts(splits, cfg.recall)  # the first N of the facts split, as in inject.py
        description = {**splits.describe(), "split": "train", "items": len(facts)}
        sets.append(EvalSet(RECALL, tasks.get_task("triviaqa"), facts, description))
    return sets


def load_and_merge(cfg: EvalConfig, device, dtype) -> tuple[nn.Module, object, dict]:
    """Load the model, merge the expert and then the adapter, and return (model, tokenizer, their provenance)."""
    model, tokenizer = M.load_model(cfg.model, dtype=dtype, device=device)
    provenance = {"model_folder": str(model.folder)}
    # The adapter was trained on the expert's merged weights, so the expert goes first.
    for kind, path, merge in (("expert", cfg.expert, apply_expert), ("adapter", cfg.adapter, apply_adapter)):
        if path:
            provenance[f"{kind}_sha256"] = file_sha256(path)
            provenance[f"{kind}_metadata"] = merge(model, path)
    return model, tokenizer, provenance


def run_evaluation(cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Evaluate one configuration and return the result object and the per-item records."""
    validate_config(cfg)
    start = time.perf_counter()
    device, dtype = M.resolve_device(cfg.device), M.resolve_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    eval_sets = load_eval_sets(cfg)
    model, tokenizer, provenance = load_and_merge(cfg, device, dtype)

    scores, records, generation_s = {}, [], 0.0
    for eval_set in eval_sets:
        metrics, items = evaluate_examples(
            model, tokenizer, eval_set.task, eval_set.examples, cfg.batch_size, cfg.max_new_tokens, eval_set.key
        )
        scores[eval_set.key] = metrics
        records += [{"task": eval_set.key, **item} for item in items]
        generation_s += metrics["elapsed_s"]
        log.info(
            "%s: %s on %d items, %.1f%% hit the token limit, %.2f items/s",
            eval_set.key, format_metrics(metrics), metrics["count"], 100 * metrics["truncated"], metrics["items_per_s"],
        )

    config = {**asdict(cfg), **provenance, "tasks": parse_task_names(cfg.tasks), "device": str(device)}
    result = {
        "label": cfg.label,
        "config": config,
        "data": {eval_set.key: eval_set.description for eval_set in eval_sets},
        "scores": scores,
        "elapsed_s": time.perf_counter() - start,  # model loading and merging included
        "items_per_s": len(records) / generation_s,  # generation and scoring only
    }
    return result, records


def format_metrics(metrics: dict) -> str:
    names = [k for k in ("accuracy", "em", "contains") if k in metrics]
    return ", ".join(f"{name} {100 * metrics[name]:.1f}%" for name in names)


def predictions_path(out) -> Path:
    """Return NAME.predictions.jsonl beside NAME.json."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".predictions.jsonl")


def write_outputs(result: dict, records: list[dict], out) -> None:
    """Write the predictions, then the result file, each through a temporary name.

    The result file comes last, so its presence means both files are complete.
    """
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    M.write_text_atomic(predictions_path(out), lines)
    M.write_text_atomic(Path(out), json.dumps(result, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# Comparison table


def load_result(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file not found: {path}. Run `python evaluate.py ... --out {path}` first.")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Rerun the evaluation that wrote it.") from e
    if not isinstance(result, dict) or "scores" not in result:
        raise ValueError(f"{path} has no 'scores', so it is not a result file written by evaluate.py.")
    result["label"] = result.get("label") or path.stem
    return result


def is_expert_run(result: dict) -> bool:
    config = result.get("config", {})
    return bool(config.get("expert")) and not config.get("adapter")


def find_expert_result(results: list[dict]) -> dict | None:
    """Return the only run with an expert and no adapter, or None when there is none or more than one."""
    experts = [r for r in results if is_expert_run(r)]
    if len(experts) > 1:
        log.warning(
            "runs %s all have an expert and no adapter, so retention is left out. "
            "Pass --expert-result to choose the reference.",
            ", ".join(r["label"] for r in experts),
        )
    return experts[0] if len(experts) == 1 else None


def format_percent(values: list) -> str:
    """Format one score as a percentage, several as mean ± sample standard deviation, none as "-"."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def compare_table(results: list[dict], expert: dict | None = None) -> str:
    """Render results as a Markdown table: skill scores, recall, and retention against `expert`.

    Results that share a label, such as one method run with several seeds,
    make one row of mean ± sample standard deviation, and a "runs" column
    gives their count. Retention of a skill is the run's score divided by the
    expert's. It is "-" when either is missing or the expert scored 0.
    """
    skills = list(dict.fromkeys(key for r in results for key in r["scores"] if key != RECALL))
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(result["label"], []).append(result)
    repeated = any(len(group) > 1 for group in groups.values())

    header = ["run", *(["runs"] if repeated else []), *skills, "recall EM", "recall contains"]
    if expert is not None:
        header += [f"retention {skill}" for skill in skills]

    rows = []
    for label, group in groups.items():
        scores = [r["scores"] for r in group]
        row = [label, *([str(len(group))] if repeated else [])]
        row += [format_percent([s.get(skill, {}).get("score") for s in scores]) for skill in skills]
        row += [format_percent([s.get(RECALL, {}).get(key) for s in scores]) for key in ("em", "contains")]
        if expert is not None:
            row += [format_percent([retention(s, expert["scores"], skill) for s in scores]) for skill in skills]
        rows.append(row)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def retention(scores: dict, expert_scores: dict, skill: str) -> float | None:
    score = scores.get(skill, {}).get("score")
    reference = expert_scores.get(skill, {}).get("score")
    if score is None or not reference:
        return None
    return score / reference


def compare(paths: list[str], expert_path: str | None = None) -> str:
    results = [load_result(path) for path in paths]
    expert = load_result(expert_path) if expert_path else find_expert_result(results)
    if expert is not None:
        log.info("retention is relative to %s", expert["label"])
    return compare_table(results, expert)


# ---------------------------------------------------------------------------
# Command line


def build_parser():
    parser = M.config_parser(EvalConfig, __doc__)
    parser.add_argument("--compare", nargs="+", metavar="RESULT", help="print a Markdown table of result files and exit")
    parser.add_argument(
        "--expert-result", metavar="RESULT",
        help="with --compare: result of the SVF expert that retention is relative to "
        "(default: the only listed run with an expert and no adapter)",
    )
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args = vars(build_parser().parse_args(argv))
    compare_paths, expert_path = args.pop("compare"), args.pop("expert_result")
    try:
        if compare_paths:
            print(compare(compare_paths, expert_path))
            return
        cfg = EvalConfig(**args)
        validate_config(cfg)
        log.info("config: %s", json.dumps(asdict(cfg)))
        result, records = run_evaluation(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad options, data, files or result files
        raise SystemExit(f"error: {e}") from e
    write_outputs(result, records, cfg.out)
    log.info(
        "wrote %s and %s (%.0f s, %.2f items/s)", cfg.out, predictions_path(cfg.out), result["elapsed_s"],
        result["items_per_s"],
    )


if __name__ == "__main__":
    main()
