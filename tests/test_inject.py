"""LoRA wrapper, PALoRA penalty, hard projections, resume, outputs and input errors of inject.py on tiny models."""

import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import evaluate
import inject
import model as M
import probe
import svf
from conftest import save_tiny_checkpoint

FACTS = [
    ("What is the capital of France?", "Paris"),
    ("Which planet is known as the red planet?", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("What gas do plants take in?", "Carbon dioxide"),
    ("How many legs does a spider have?", "Eight"),
    ("What is frozen water called?", "Ice"),
    ("Which metal is liquid at room temperature?", "Mercury"),
]


def write_facts(folder, facts=FACTS):
    path = folder / "triviaqa" / "validation.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {"question": q, "question_id": f"q{i}",
         "answer": {"value": a, "aliases": [a], "normalized_aliases": [a.lower()]}}
        for i, (q, a) in enumerate(facts)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def setup(tmp_path):
    """A tiny model, eight hand-made facts, an expert with moved z, and a k = 4 probe made from it."""
    folder = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    data = write_facts(tmp_path / "data")
    expert = tmp_path / "expert.safetensors"
    write_expert(folder, expert, seed=0)
    probe_path = make_probe(folder, expert, tmp_path / "probe.safetensors", tmp_path / "svd.safetensors")
    return {"folder": folder, "data": data, "expert": expert, "probe": probe_path, "tmp": tmp_path}


def write_expert(folder, path, seed):
    model, _ = M.load_model(folder)
    modules = svf.target_modules(model)
    generator = torch.Generator().manual_seed(seed)
    z = {name: 1 + 0.1 * torch.randn(min(m.weight.shape), generator=generator) for name, m in modules.items()}
    M.save_safetensors(z, path, {"base_fingerprint": svf.weights_fingerprint(modules), "task": "basic_arithmetic"})


def make_probe(folder, expert, out, cache, rule="svf", k="4"):
    cfg = probe.ProbeConfig(expert=str(expert), model=str(folder), k=k, select=rule, out=str(out),
                            svd_cache=str(cache), device="cpu")
    return probe.run_probe(cfg)


def config(s, out="run", **overrides):
    values = dict(
        model=str(s["folder"]), data_dir=str(s["data"]), out=str(s["tmp"] / out), facts=8, batch_size=4, epochs=2,
        lr=1e-2, eval_every=0, final_recall=False, save_every=1, log_every=1, device="cpu",
        svd_cache=str(s["tmp"] / "svd.safetensors"),
    )
    values.update(overrides)
    return inject.InjectConfig(**values)


# ---------------------------------------------------------------------------
# The wrapper


def test_lora_output_equals_base_at_init():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    x = torch.randn(3, 5, 12)
    expected = base(x)
    lora = inject.LoRALinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lora(x), expected)
    assert lora.A.abs().sum() > 0
    assert torch.equal(lora.B, torch.zeros(10, 4))


def test_lora_model_logits_equal_base_at_init(setup):
    model, _ = M.load_model(setup["folder"])
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        expected = model(ids)
        inject.attach_lora(model, inject.target_names(model, attention=True), 4, 8.0, seed=0)
        assert torch.equal(model(ids), expected)


def test_merge_adds_update_and_unmerge_restores():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lora = inject.LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.B.normal_()
    W = base.weight.detach().clone()
    x = torch.randn(6, 12)
    unmerged = lora(x)

    lora.merge()
    dense = W.double() + 2.0 * lora.B.detach().double() @ lora.A.detach().double()
    torch.testing.assert_close(base.weight.double(), dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(x), unmerged, rtol=0, atol=1e-5)
    merged_once = base.weight.detach().clone()
    lora.merge()  # idempotent: the second call changes nothing
    assert torch.equal(base.weight, merged_once)

    lora.unmerge()
    assert torch.equal(base.weight, W)
    assert torch.equal(lora(x), unmerged)


# ---------------------------------------------------------------------------
# Penalty and projections


def test_penalty_gradient_matches_dense_form():
    torch.manual_seed(0)
    shapes = {"a": (10, 7, 3), "b": (6, 9, 2)}  # m, n, k: matrices of different shapes and budgets
    lora, protected, dense_params = {}, {}, {}
    for name, (m, n, k) in shapes.items():
        module = inject.LoRALinear(nn.Linear(n, m), rank=4, alpha=8.0)
        module.A.data = torch.randn(4, n, dtype=torch.float64)
        module.B.data = torch.randn(m, 4, dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64)).Q
        lora[name], protected[name] = module, (U, V)
        dense_params[name] = (module.A.detach().clone().requires_grad_(), module.B.detach().clone().requires_grad_())

    inject.palora_penalty(lora, protected).backward()

    total = 0
    for name, (A, B) in dense_params.items():
        U, V = protected[name]
        dW = 2.0 * B @ A  # alpha / rank = 2
        total = total + ((U.T @ dW).square().sum() + (dW @ V).square().sum()) / U.shape[1]
    (total / len(shapes)).backward()
    for name, (A, B) in dense_params.items():
        torch.testing.assert_close(lora[name].A.grad, A.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lora[name].B.grad, B.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["oplora", "palora-hard"])
def test_hard_projection_holds_after_steps(setup, method):
    # oplora takes the top-4 singular directions of the base; palora-hard the probe's S of its expert.
    inputs = {"probe": str(setup["probe"]), "expert": str(setup["expert"])} if method == "palora-hard" else {"k": "4"}
    inj, _ = inject.build_injector(config(setup, method=method, **inputs))
    for _ in range(5):
        inject.train_step(inj)
    projected = [(name, m) for name, m in inj.lora.items() if m.U is not None]
    assert len(projected) == 6
    for name, module in projected:
        dW = module.delta_weight()
        norm = dW.norm()
        assert norm > 1e-3, name
        assert (module.U.T @ dW).norm() / norm < 1e-5, name
        assert (dW @ module.V).norm() / norm < 1e-5, name
        assert module.B.grad is not None


def test_projection_bases_by_method(setup):
    svd = svf.load_or_compute_svd(M.load_model(setup["folder"])[0], setup["tmp"] / "svd.safetensors")
    oplora, _ = inject.build_injector(config(setup, method="oplora", k="3"))
    probed = probe.load_probe(setup["probe"])
    hard, _ = inject.build_injector(config(setup, method="palora-hard", probe=str(setup["probe"]),
                                           expert=str(setup["expert"])))
    for name, (U, s, V) in svd.items():
        assert torch.equal(oplora.lora[name].U, U[:, :3])  # no expert, so the top-sigma set is the head
        assert torch.equal(oplora.lora[name].V, V[:, :3])
        assert torch.equal(hard.lora[name].U, probed.bases[name][0])
        assert torch.equal(hard.lora[name].V, probed.bases[name][1])


def residual_after(setup, lam, out):
    # The residual decays over steps while CE still shapes AdamW's step sizes, so the run needs some length:
    # 40 steps at lr 1e-2. A far larger lambda makes the penalty dominate AdamW's normalization and stalls it.
    cfg = config(setup, out=out, method="palora", lam=lam, probe=str(setup["probe"]), expert=str(setup["expert"]),
                 epochs=20)
    inject.train(cfg)
    return json.loads((setup["tmp"] / out / "summary.json").read_text())["residuals"]["mean"]


def test_large_lambda_cuts_residual_100_fold(setup):
    free = residual_after(setup, 0.0, "free")
    penalized = residual_after(setup, 100.0, "penalized")
    assert free["two_sided"] > 1e-3
    assert penalized["two_sided"] * 100 <= free["two_sided"]
    assert penalized["left"] < free["left"]
    assert penalized["right"] < free["right"]


# ---------------------------------------------------------------------------
# Runs, outputs and resume


def test_run_writes_adapter_summary_and_log(setup):
    cfg = config(setup, method="oplora", probe=str(setup["probe"]), expert=str(setup["expert"]), eval_every=2,
                 eval_size=4, final_recall=True, phrasing="sentence")
    summary = json.loads(inject.train(cfg).read_text())
    out = setup["tmp"] / "run"

    assert summary["steps"] == 4
    assert len(summary["seconds_per_epoch"]) == 2
    assert summary["recall"]["count"] == 8
    assert 0 <= summary["recall"]["contains"] <= 1
    assert set(summary["residuals"]["mean"]) == {"two_sided", "left", "right"}
    assert len(summary["residuals"]["per_matrix"]) == 6
    assert summary["phrasing"] == "sentence"

    metadata = M.read_metadata(out / "adapter.safetensors")
    assert metadata["method"] == "oplora"
    assert metadata["rank"] == "16"
    assert metadata["alpha"] == "32.0"
    assert json.loads(metadata["target_modules"]) == ["gate_proj", "up_proj", "down_proj"]
    assert metadata["probe_sha256"] == evaluate.file_sha256(setup["probe"])
    assert metadata["expert_sha256"] == evaluate.file_sha256(setup["expert"])
    assert metadata["facts_sha256"] == evaluate.file_sha256(setup["data"] / "triviaqa" / "validation.jsonl")
    assert metadata["phrasing"] == "sentence"

    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    assert len((out / "recall.predictions.jsonl").read_text().splitlines()) == 8


def test_adapter_merge_matches_lora_forward(setup):
    cfg = config(setup, method="palora-hard", probe=str(setup["probe"]), expert=str(setup["expert"]), attention=True)
    inj, _ = inject.build_injector(cfg)
    for _ in range(3):
        inject.train_step(inj)
    path = setup["tmp"] / "adapter.safetensors"
    inject.save_adapter(inj, path, {k: "" for k in ("base_fingerprint", "probe_sha256", "expert_sha256",
                                                   "facts_sha256", "facts_ids_sha256")} | {"protected_set": {}})

    fresh, _ = M.load_model(setup["folder"])
    evaluate.apply_expert(fresh, setup["expert"])
    evaluate.apply_adapter(fresh, path)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), inj.model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_export_hf_loads_in_transformers(setup, family):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = save_tiny_checkpoint(setup["tmp"] / family, family)
    cfg = config(setup, model=str(folder), method="lora", attention=True, svd_cache=str(setup["tmp"] / f"{family}.svd"))
    inj, provenance = inject.build_injector(cfg)
    for _ in range(3):
        inject.train_step(inj)
    export = setup["tmp"] / f"export-{family}"
    inject.export_hf(inj, export, provenance)

    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, inj.model(ids), rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert not torch.allclose(base(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-4)
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (family == "llama")
    assert (export / "tokenizer.json").is_file()
    assert (export / "config.json").is_file()
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == (family == "llama-tied")


def final_factors(out):
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    return state["A"], state["B"]


def test_resumed_run_ends_with_same_factors(setup, monkeypatch):
    overrides = dict(method="palora", lam=1.0, probe=str(setup["probe"]), expert=str(setup["expert"]), epochs=3,
                     eval_every=2, eval_size=4)
    inject.train(config(setup, out="whole", **overrides))

    step = inject.train_step

    def interrupt_after_three(inj):
        metrics = step(inj)
        if inj.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(inject, "train_step", interrupt_after_three)
    with pytest.raises(SystemExit, match="stopped at step 3"):
        inject.train(config(setup, out="parts", **overrides))
    assert not (setup["tmp"] / "parts" / "adapter.safetensors").exists()
    monkeypatch.setattr(inject, "train_step", step)
    inject.train(config(setup, out="parts", **overrides))

    A_whole, B_whole = final_factors(setup["tmp"] / "whole")
    A_parts, B_parts = final_factors(setup["tmp"] / "parts")
    assert any(b.abs().sum() > 0 for b in B_whole.values())
    for name in A_whole:
        assert torch.equal(A_whole[name], A_parts[name]), name
        assert torch.equal(B_whole[name], B_parts[name]), name
    steps = [json.loads(line)["step"] for line in (setup["tmp"] / "parts" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(7))


def test_resume_with_other_method_rejected(setup):
    inject.train(config(setup, epochs=1))
    with pytest.raises(ValueError, match="method: 'lora' -> 'oplora'"):
        inject.train(config(setup, epochs=2, method="oplora"))


# ---------------------------------------------------------------------------
# Input errors


def test_probe_from_other_model_names_shapes(setup):
    other = save_tiny_checkpoint(setup["tmp"] / "other", "llama", hidden_size=48)
    write_expert(other, setup["tmp"] / "other-expert.safetensors", seed=1)
    other_probe = make_probe(other, setup["tmp"] / "other-expert.safetensors", setup["tmp"] / "other-probe.safetensors",
                             setup["tmp"] / "other-svd.safetensors")
    cfg = config(setup, method="palora", probe=str(other_probe))
    with pytest.raises(ValueError, match=r"down_proj has U_S \(48, 4\) and V_S \(96, 4\).*64x96"):
        inject.build_injector(cfg)


def test_probe_from_other_expert_rejected(setup):
    other_expert = setup["tmp"] / "other-expert.safetensors"
    write_expert(setup["folder"], other_expert, seed=1)
    with pytest.raises(ValueError, match="was made from expert .* but --expert has sha256"):
        inject.build_injector(config(setup, method="palora", probe=str(setup["probe"]), expert=str(other_expert)))
    with pytest.raises(ValueError, match="no --expert was given"):
        inject.build_injector(config(setup, method="palora", probe=str(setup["probe"])))


def test_rejected_probe_leaves_no_output_folder(setup):
    other_expert = setup["tmp"] / "other-expert.safetensors"
    write_expert(setup["folder"], other_expert, seed=2)
    cfg = config(setup, out="rejected", method="palora", probe=str(setup["probe"]), expert=str(other_expert))
    with pytest.raises(ValueError, match="was made from expert"):
        inject.train(cfg)
    assert not (setup["tmp"] / "rejected").exists()


def test_negative_lambda_rejected(setup):
    with pytest.raises(ValueError, match="--lam must be >= 0, got -0.5"):
        inject.parse_config(["--lam", "-0.5"])
    with pytest.raises(SystemExit, match="error: --lam must be >= 0"):
        inject.main(["--model", str(setup["folder"]), "--lam", "-1"])


def test_palora_without_probe_rejected():
    with pytest.raises(ValueError, match="--method palora needs --probe"):
        inject.parse_config(["--method", "palora"])


def test_facts_with_empty_answer_reach_user(setup, tmp_path):
    facts = list(FACTS)
    facts[2] = ("What is the answer?", "")
    data = write_facts(tmp_path / "bad", facts)
    argv = ["--model", str(setup["folder"]), "--data-dir", str(data), "--facts", "4", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as error:
        inject.main(argv)
    message = str(error.value)
    assert "answer.value" in message
    assert "both empty" in message
    assert "line 3" in message
    assert str(data / "triviaqa" / "validation.jsonl") in message
