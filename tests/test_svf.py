"""SVF parametrization, REINFORCE sign, checkpoint resume and error handling on a tiny model."""

import json
import os
import signal

import pytest
import torch

import model as M
import svf
from conftest import data_dir, save_tiny_checkpoint


@pytest.fixture
def tiny(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    model, tokenizer = M.load_model(folder)
    return folder, model, tokenizer


def attach(model):
    svd = svf.compute_svd(svf.target_modules(model))
    return svd, svf.attach_svf(model, svd)


def test_z_one_reproduces_base_logits_exactly(tiny):
    _, model, _ = tiny
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        base = model(ids)
        _, modules = attach(model)
        svf.rebuild_all(modules)
        assert len(modules) == 3 * model.config.num_hidden_layers
        assert torch.equal(model(ids), base)


def test_z_gradient_matches_dense_form(tiny):
    _, model, _ = tiny
    svd, modules = attach(model)
    name, module = next(iter(modules.items()))
    with torch.no_grad():
        module.z.uniform_(0.5, 1.5)
    x = torch.randn(5, module.base.in_features, dtype=torch.float64)
    target = torch.randn(5, module.base.out_features, dtype=torch.float64)

    module.rebuild()
    ((x.float() @ module.rebuilt.T - target.float()) ** 2).sum().backward()
    factored = module.z.grad.clone()

    U, s, V = (t.double() for t in svd[name])
    z = module.z.detach().double().requires_grad_()
    dense = U @ torch.diag(s * z) @ V.T
    ((x @ dense.T - target) ** 2).sum().backward()
    torch.testing.assert_close(factored.double(), z.grad, rtol=1e-3, atol=1e-3)


def test_merge_expert_matches_rebuilt_weight(tiny):
    folder, model, _ = tiny
    svd, modules = attach(model)
    with torch.no_grad():
        for m in modules.values():
            m.z.uniform_(0.8, 1.2)
    svf.rebuild_all(modules)
    z = {n: m.z.detach().clone() for n, m in modules.items()}
    merged, _ = M.load_model(folder)
    svf.merge_expert(merged, z, svd)
    for name, m in svf.target_modules(merged).items():
        torch.testing.assert_close(m.weight, modules[name].rebuilt.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_reinforce_step_has_right_sign(tiny, reward):
    _, model, tokenizer = tiny
    _, modules = attach(model)
    cfg = svf.SVFConfig(baseline="none", lr=1e-2)
    optimizer = torch.optim.Adam([m.z for m in modules.values()], lr=cfg.lr)
    trainer = svf.Trainer(cfg, model, tokenizer, None, None, modules, optimizer, "fingerprint")
    svf.rebuild_all(modules)
    generation = M.generate(model, tokenizer, ["What is 2 + 2?"], max_new_tokens=6, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))

    def completion_logprob():
        svf.rebuild_all(modules)
        lp, mask = M.completion_logprobs(model, [generation[0].prompt_ids], [generation[0].token_ids])
        return (lp * mask).sum().item()

    before = completion_logprob()
    loss, _ = svf.rollout_loss(trainer, None, generation, torch.tensor([reward]))
    loss.backward()
    optimizer.step()
    after = completion_logprob()
    assert (after - before) * reward > 0


def run_config(folder, out, **overrides):
    values = dict(
        model=str(folder), task="basic_arithmetic", out=str(out), steps=4, batch_size=4, max_new_tokens=4,
        eval_every=2, eval_size=4, eval_batch_size=4, save_every=1, baseline="none", lr=0.05,
        svd_cache=str(out.parent / "svd.safetensors"),
    )
    values.update(overrides)
    return svf.SVFConfig(**values)


def final_z(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["z"]


needs_data = pytest.mark.skipif(data_dir() is None, reason="local data folder not found")


@needs_data
def test_resumed_run_ends_with_same_z(tiny, tmp_path, monkeypatch):
    folder = tiny[0]
    svf.train(run_config(folder, tmp_path / "whole"))

    # Interrupt the second run after step 2 the way Ctrl-C does, then resume.
    step = svf.train_step

    def interrupt_after_two(trainer):
        metrics = step(trainer)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(svf, "train_step", interrupt_after_two)
    with pytest.raises(SystemExit, match="stopped at step 2"):
        svf.train(run_config(folder, tmp_path / "parts"))
    monkeypatch.setattr(svf, "train_step", step)
    svf.train(run_config(folder, tmp_path / "parts"))

    whole, parts = final_z(tmp_path / "whole"), final_z(tmp_path / "parts")
    assert any(not torch.equal(z, torch.ones_like(z)) for z in whole.values())
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    metadata = M.read_metadata(tmp_path / "parts" / "expert.safetensors")
    assert metadata["task"] == "basic_arithmetic"
    assert metadata["steps"] == "4"


@needs_data
def test_resume_from_other_task_is_rejected(tiny, tmp_path):
    folder = tiny[0]
    svf.train(run_config(folder, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match="task 'basic_arithmetic'.*not task 'gsm8k'"):
        svf.train(run_config(folder, tmp_path / "run", task="gsm8k", steps=2))


@needs_data
def test_non_finite_loss_stops_and_keeps_last_good_z(tiny, tmp_path, monkeypatch):
    folder = tiny[0]
    real_loss = svf.rollout_loss
    calls = []

    def nan_on_second_step(trainer, *args):
        loss, kl = real_loss(trainer, *args)
        calls.append(1)
        return (loss * float("nan"), kl) if len(calls) == 2 else (loss, kl)

    monkeypatch.setattr(svf, "rollout_loss", nan_on_second_step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="loss is nan at step 2"):
        svf.train(run_config(folder, out, eval_every=10))
    z = final_z(out)
    assert all(torch.isfinite(t).all() for t in z.values())
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1


def test_missing_model_leaves_no_output_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(M.CheckpointError, match="model path not found"):
        svf.train(run_config(tmp_path / "no-model", out))
    assert not out.exists()


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="no_such_task"):
        svf.parse_config(["--task", "no_such_task"])


def test_facts_task_is_not_a_skill():
    with pytest.raises(ValueError, match="not a skill task"):
        svf.parse_config(["--task", "triviaqa"])


@needs_data
def test_equal_rewards_skip_backward(tiny, tmp_path, monkeypatch):
    trainer = svf.build_trainer(run_config(tiny[0], tmp_path / "run", baseline="mean"))
    monkeypatch.setattr(trainer.task, "score", lambda example, completion: {"correct": False})

    def fail(*args):
        raise AssertionError("rollout_loss must not run when every advantage is zero")

    monkeypatch.setattr(svf, "rollout_loss", fail)
    metrics = svf.train_step(trainer)
    assert metrics["loss"] == 0.0
    assert metrics["grad_norm"] == 0.0
    assert trainer.step == 1
    assert all(torch.equal(m.z.grad, torch.zeros_like(m.z)) for m in trainer.svf_modules.values())


@needs_data
@pytest.mark.parametrize("task", ["gsm8k", "arc_easy", "basic_arithmetic", "mbpp"])
def test_train_step_runs_for_each_task(tiny, tmp_path, task):
    trainer = svf.build_trainer(run_config(tiny[0], tmp_path / "run", task=task, batch_size=2))
    metrics = svf.train_step(trainer)
    assert metrics["step"] == 1
    assert metrics["reward"] in (-1.0, 0.0, 1.0)
    assert all(torch.isfinite(m.z).all() for m in trainer.svf_modules.values())
