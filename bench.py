"""Benchmarks: the hand-written model against `transformers`, and the cost of each stage's step.

Every figure is measured in this run, next to its reference, and printed as
a ratio. Each measurement runs in a fresh subprocess, so peak memory (peak
resident set size on the CPU, peak allocated memory on CUDA) belongs to one
model and one workload.

    python bench.py                          # all sections on the default model
    python bench.py --sections model --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time

import torch

import model as M

log = logging.getLogger("palora.bench")

SECTIONS = ("model", "svf", "inject")


# ---------------------------------------------------------------------------
# Workers: one model, one workload, one process


def load_implementation(implementation: str, folder, device, requires_grad: bool):
    """Load "ours" (model.py) or "hf" (transformers' AutoModelForCausalLM) in float32."""
    if implementation == "ours":
        model, tokenizer = M.load_model(folder, dtype=torch.float32, device=device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(requires_grad)
    return model, tokenizer


def logits_of(implementation: str, model, ids):
    return model(ids) if implementation == "ours" else model(input_ids=ids).logits


def train_worker(implementation, folder, device, batch, length, iters) -> dict:
    """Forward and backward of a full-vocabulary cross-entropy loss on random tokens."""
    model, _ = load_implementation(implementation, folder, device, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)

    def step():
        logits = logits_of(implementation, model, ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator and kernel selection
    seconds = timed(step, iters, device)
    return {"tokens_per_s": batch * length * iters / seconds}


def generate_worker(implementation, folder, device, batch, new_tokens, iters) -> dict:
    """Batched greedy generation of chat answers; both implementations emit the same tokens."""
    model, tokenizer = load_implementation(implementation, folder, device, requires_grad=False)
    questions = [f"Write a short story about the number {i}." for i in range(batch)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    counts = []

    def step():
        if implementation == "ours":
            out = M.generate(model, tokenizer, prompts, max_new_tokens=new_tokens)
            counts.append(sum(len(g.token_ids) for g in out))
        else:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            generated = out[:, enc["input_ids"].shape[1]:]
            counts.append(sum(_length_to_eos(row, tokenizer.eos_token_id) for row in generated.tolist()))

    step()
    counts.clear()
    seconds = timed(step, iters, device)
    return {"tokens_per_s": sum(counts) / seconds, "tokens": sum(counts) // iters}


def _length_to_eos(row, eos_id):
    return row.index(eos_id) + 1 if eos_id in row else len(row)


def timed(fn, iters, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


WORKERS = {"train": train_worker, "generate": generate_worker}


def run_worker(args) -> None:
    device = M.resolve_device(args.device)
    folder = M.resolve_checkpoint(args.model)
    workload = json.loads(args.worker)
    result = WORKERS[workload.pop("name")](workload.pop("implementation"), folder, device, **workload)
    result["peak_mb"] = peak_memory_mb(device)
    print(json.dumps(result))


# ---------------------------------------------------------------------------
# Driver


def measure(args, workload: dict) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--worker", json.dumps(workload)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker {workload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(args, name: str, workload: dict) -> list[str]:
    """Alternate ours and transformers `repeats` times; keep each side's best speed and lowest peak.

    Each repeat also gives one ratio of ours to transformers from its pair of
    runs. The median and range of these ratios show how far the machine's
    noise reaches.
    """
    best, pair_ratios = {}, {"tokens_per_s": [], "peak_mb": []}
    for repeat in range(args.repeats):
        # Alternate which side runs first, so drift in machine load favours neither.
        pair = {}
        for implementation in ("ours", "hf") if repeat % 2 == 0 else ("hf", "ours"):
            r = measure(args, {**workload, "implementation": implementation})
            log.info("%s %s: %s", name, implementation, r)
            pair[implementation] = r
            b = best.setdefault(implementation, dict(r))
            b["tokens_per_s"] = max(b["tokens_per_s"], r["tokens_per_s"])
            b["peak_mb"] = min(b["peak_mb"], r["peak_mb"])
        for key, ratios in pair_ratios.items():
            ratios.append(pair["ours"][key] / pair["hf"][key])
    ours, hf = best["ours"], best["hf"]
    return [
        (f"| {name} tokens/s | {ours['tokens_per_s']:.1f} | {hf['tokens_per_s']:.1f} | "
         f"{ours['tokens_per_s'] / hf['tokens_per_s']:.3f} | {format_spread(pair_ratios['tokens_per_s'])} |"),
        (f"| {name} peak memory (MiB) | {ours['peak_mb']:.0f} | {hf['peak_mb']:.0f} | "
         f"{ours['peak_mb'] / hf['peak_mb']:.3f} | {format_spread(pair_ratios['peak_mb'])} |"),
    ]


def format_spread(values: list[float]) -> str:
    """Format ratios as "median (min-max)"."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def model_section(args) -> list[str]:
    header = "| measurement | ours | transformers | ours / transformers, best of each | per pair: median (range) |"
    rows = [header, "|---|---|---|---|---|"]
    rows += compare(args, f"forward+backward {args.train_batch}x{args.train_length}",
                    {"name": "train", "batch": args.train_batch, "length": args.train_length, "iters": args.iters})
    rows += compare(args, f"greedy generation {args.gen_batch}x{args.gen_tokens}",
                    {"name": "generate", "batch": args.gen_batch, "new_tokens": args.gen_tokens, "iters": args.iters})
    return rows


def svf_section(args) -> list[str]:
    """Time SVF steps on the default task and split each into rebuild, rollout and forward/backward."""
    import svf

    cfg = svf.SVFConfig(model=args.model, task="basic_arithmetic", batch_size=args.svf_batch, device=args.device)
    trainer = svf.build_trainer(cfg)
    steps = [svf.train_step(trainer) for _ in range(args.iters + 1)][1:]  # the first step warms up
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in ("ms", "ms_rebuild", "ms_rollout", "ms_forward_backward")}
    rows = ["| part of one SVF step | ms | share of the step |", "|---|---|---|"]
    for key, label in (("ms_rebuild", f"rebuild W' of {len(trainer.svf_modules)} matrices"),
                       ("ms_rollout", f"rollout ({cfg.batch_size} prompts, sampled)"),
                       ("ms_forward_backward", "forward+backward on completions"), ("ms", "whole step")):
        rows.append(f"| {label} | {mean[key]:.0f} | {mean[key] / mean['ms']:.3f} |")
    return rows


def inject_section(args) -> list[str]:
    """Time PALoRA steps against plain LoRA steps on one model and one batch of facts, alternating them.

    The protected bases are random orthonormal columns, k = 16 per MLP matrix,
    because the penalty's cost does not depend on which directions it protects.
    """
    import dataclasses

    import inject
    import tasks

    cfg = inject.InjectConfig(model=args.model, device=args.device)
    device = M.resolve_device(cfg.device)
    model, tokenizer = M.load_model(cfg.model, device=device)
    facts = tasks.sample_facts(tasks.load_splits("triviaqa"), cfg.batch_size)  # every step trains on these facts
    encoded = inject.encode_facts(tokenizer, facts, cfg.phrasing)
    lora = inject.attach_lora(model, inject.target_names(model, attention=False), cfg.rank, cfg.alpha, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    protected = {}
    for name, module in lora.items():
        m, n = module.base.weight.shape
        U = torch.linalg.qr(torch.randn(m, 16, generator=generator)).Q
        V = torch.linalg.qr(torch.randn(n, 16, generator=generator)).Q
        protected[name] = (U.to(device), V.to(device))

    runs = {}
    for method in ("lora", "palora"):
        optimizer = torch.optim.AdamW([p for mod in lora.values() for p in (mod.A, mod.B)], lr=cfg.lr)
        runs[method] = inject.Injector(dataclasses.replace(cfg, method=method), model, tokenizer, facts, encoded, lora,
                                       protected if method == "palora" else {}, optimizer, identity={})
        inject.train_step(runs[method])  # warm-up
    ms = {"lora": [], "palora": []}
    for pair in range(args.repeats * args.iters):
        for method in ("lora", "palora") if pair % 2 == 0 else ("palora", "lora"):
            ms[method].append(inject.train_step(runs[method])["ms"])
        log.info("inject step pair %d: lora %.0f ms, palora %.0f ms", pair + 1, ms["lora"][-1], ms["palora"][-1])

    lora_ms, palora_ms = statistics.median(ms["lora"]), statistics.median(ms["palora"])
    return [
        "| measurement | lora | palora | palora / lora |", "|---|---|---|---|",
        f"| median step time over {len(ms['lora'])} steps (ms), {cfg.batch_size} facts, rank {cfg.rank}, "
        f"{len(protected)} matrices with k = 16 | {lora_ms:.0f} | {palora_ms:.0f} | {palora_ms / lora_ms:.3f} |",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=M.DEFAULT_MODEL, help="model folder, hub id or smollm2-135m-instruct")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per implementation (default: 2)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per run (default: 3)")
    parser.add_argument("--train-batch", type=int, default=8, help="sequences per forward+backward (default: 8)")
    parser.add_argument("--train-length", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--gen-batch", type=int, default=16, help="prompts per generation batch (default: 16)")
    parser.add_argument("--gen-tokens", type=int, default=128, help="max new tokens per prompt (default: 128)")
    parser.add_argument("--svf-batch", type=int, default=32, help="rollouts per SVF step (default: 32)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    M.resolve_checkpoint(args.model)  # prepare the default model once, outside the timed workers
    sections = {"model": model_section, "svf": svf_section, "inject": inject_section}
    for name in args.sections.split(","):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(sections)}")
        print(f"\n## {name} ({args.model}, device {M.resolve_device(args.device)}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)\n")
        print("\n".join(sections[name](args)))


if __name__ == "__main__":
    main()
