"""Batched evaluation, expert and adapter merging, the command line and the comparison table, on tiny models."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import evaluate as E
import model as M
import tasks
from conftest import data_dir, save_tiny_checkpoint

GATE = "model.layers.0.mlp.gate_proj"  # (96, 64) in the tiny checkpoint
DOWN = "model.layers.1.mlp.down_proj"  # (64, 96)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture
def tiny(tiny_folder):
    return M.load_model(tiny_folder)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class ExactTask(tasks.Task):
    """A task whose answer is correct when the completion equals the gold text exactly."""

    name = "exact"
    max_new_tokens = 6

    def score(self, example, completion):
        return {"correct": completion == example.answer, "prediction": completion}


def examples_of_varied_length(n=7):
    # Lengths differ, and not in sorted order, so batching reorders them.
    questions = ["x" * (5 + (i * 7) % 23) + f" item {i}" for i in range(n)]
    return [tasks.Example(f"q{i}", q, "", {}) for i, q in enumerate(questions)]


def reference_generations(model, tokenizer, examples, max_new_tokens):
    """Generate each prompt alone, so that no batching or padding is involved."""
    return [
        M.generate(model, tokenizer, [tasks.build_prompt(tokenizer, e)], max_new_tokens=max_new_tokens)[0]
        for e in examples
    ]


# ---------------------------------------------------------------------------
# evaluate_examples


def test_batched_records_match_single_generation(tiny):
    model, tokenizer = tiny
    examples = examples_of_varied_length()
    reference = reference_generations(model, tokenizer, examples, 6)
    # Every other item gets its own unbatched completion as gold, so exactly those are correct.
    examples = [
        tasks.Example(e.id, e.question, reference[i].text if i % 2 == 0 else "no such answer", {})
        for i, e in enumerate(examples)
    ]

    metrics, records = E.evaluate_examples(model, tokenizer, ExactTask(), examples, batch_size=3)

    assert [r["id"] for r in records] == [e.id for e in examples]
    assert [r["completion"] for r in records] == [g.text for g in reference]
    assert [r["finish_reason"] for r in records] == [g.finish_reason for g in reference]
    assert [r["correct"] for r in records] == [i % 2 == 0 for i in range(len(examples))]
    assert metrics["count"] == len(examples)
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["score"] == metrics["accuracy"]
    expected_truncated = sum(g.finish_reason == "length" for g in reference) / len(reference)
    assert metrics["truncated"] == pytest.approx(expected_truncated)
    assert records[0]["prompt"] == tasks.build_prompt(tokenizer, examples[0])
    assert records[0]["gold"] == examples[0].answer


def test_max_new_tokens_overrides_task_limit(tiny):
    model, tokenizer = tiny
    examples = examples_of_varied_length(4)
    _, records = E.evaluate_examples(model, tokenizer, ExactTask(), examples, batch_size=4, max_new_tokens=2)
    assert all(r["new_tokens"] <= 2 for r in records)
    assert any(r["new_tokens"] == 2 for r in records)


def test_real_number_task_scores_predictions(tiny):
    model, tokenizer = tiny
    task = tasks.get_task("basic_arithmetic")
    examples = [tasks.Example(f"a{i}", f"Calculate {i} + {i} =\nAnswer with a number.", str(2 * i), {}) for i in range(5)]
    metrics, records = E.evaluate_examples(model, tokenizer, task, examples, batch_size=2)
    for record in records:
        expected = task.score(tasks.Example(record["id"], "", record["gold"], {}), record["completion"])
        assert record["correct"] == expected["correct"]
        assert record["prediction"] == expected["prediction"]
    assert metrics["accuracy"] == sum(r["correct"] for r in records) / 5
    assert 0 < max(r["new_tokens"] for r in records) <= task.max_new_tokens


def test_summary_of_recall_flags():
    records = [
        {"em": True, "contains": True, "prediction": "a", "finish_reason": "eos"},
        {"em": False, "contains": True, "prediction": "b", "finish_reason": "length"},
        {"em": False, "contains": False, "prediction": "c", "finish_reason": "length"},
        {"em": False, "contains": False, "prediction": "d", "finish_reason": "stop"},
    ]
    metrics = E.summarize_records(records)
    assert metrics["em"] == 0.25
    assert metrics["contains"] == 0.5
    assert metrics["score"] == 0.25
    assert metrics["truncated"] == 0.5
    assert metrics["count"] == 4
    assert "accuracy" not in metrics


def test_empty_examples_raise(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="no examples to evaluate"):
        E.evaluate_examples(model, tokenizer, ExactTask(), [])


# ---------------------------------------------------------------------------
# Experts


def write_expert(path, z_by_name, metadata=None):
    save_file({k: v.contiguous() for k, v in z_by_name.items()}, str(path), metadata=metadata or {"task": "test"})
    return path


def mlp_names(model):
    return [n for n, m in model.named_modules() if ".mlp." in n and isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_of_ones_bit_identical(tiny_folder, tmp_path, dtype):
    model, _ = M.load_model(tiny_folder, dtype=dtype)
    with torch.no_grad():
        model.get_submodule(GATE).weight[0, 0] = -0.0  # -0.0 + 0.0 is +0.0, so adding a zero update is not enough
    before = weights(model)
    z = {n: torch.ones(min(model.get_submodule(n).weight.shape)) for n in mlp_names(model)}
    metadata = E.apply_expert(model, write_expert(tmp_path / "z.safetensors", z, {"task": "arith", "seed": "3"}))
    assert metadata == {"task": "arith", "seed": "3"}
    for name, tensor in weights(model).items():
        assert torch.equal(tensor.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           before[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name


def test_expert_matches_direct_reconstruction(tiny, tmp_path):
    model, _ = tiny
    before = weights(model)
    z_gate = torch.ones(64)
    z_gate[0], z_gate[5], z_gate[63] = 0.0, 1.7, 0.3  # drop the largest component, scale others
    z_down = torch.linspace(0.5, 1.5, 64)
    E.apply_expert(model, write_expert(tmp_path / "z.safetensors", {GATE: z_gate, DOWN: z_down}))

    for name, z in ((GATE, z_gate), (DOWN, z_down)):
        U, s, Vh = torch.linalg.svd(before[name + ".weight"].double(), full_matrices=False)
        direct = U @ torch.diag(s * z.double()) @ Vh
        torch.testing.assert_close(model.get_submodule(name).weight.double(), direct, atol=2e-5, rtol=1e-5)
        assert not torch.allclose(model.get_submodule(name).weight, before[name + ".weight"])
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.get_submodule(untouched.removesuffix(".weight")).weight, before[untouched])


def test_expert_uses_supplied_svd(tiny_folder, tmp_path):
    z = torch.linspace(0.0, 2.0, 64)
    path = write_expert(tmp_path / "z.safetensors", {GATE: z})
    computed, _ = M.load_model(tiny_folder)
    E.apply_expert(computed, path)

    supplied, _ = M.load_model(tiny_folder)
    U, s, Vh = torch.linalg.svd(supplied.get_submodule(GATE).weight.float(), full_matrices=False)
    E.apply_expert(supplied, path, svd={GATE: (U, s, Vh.T.contiguous())})
    torch.testing.assert_close(supplied.get_submodule(GATE).weight, computed.get_submodule(GATE).weight)

    # A deliberately wrong SVD must change the result, which proves it is used.
    wrong, _ = M.load_model(tiny_folder)
    E.apply_expert(wrong, path, svd={GATE: (U, 2 * s, Vh.T.contiguous())})
    assert not torch.allclose(wrong.get_submodule(GATE).weight, computed.get_submodule(GATE).weight)


def test_expert_wrong_length_names_shapes(tiny, tmp_path):
    model, _ = tiny
    before = weights(model)
    path = write_expert(tmp_path / "z.safetensors", {DOWN: torch.full((64,), 0.5), GATE: torch.ones(576)})
    with pytest.raises(E.ModelMismatchError) as error:
        E.apply_expert(model, path)
    message = str(error.value)
    assert GATE in message
    assert "(576,)" in message
    assert "(64,)" in message
    # Validation happens before merging, so the valid DOWN entry was not applied either.
    assert all(torch.equal(t, before[n]) for n, t in weights(model).items())


def test_expert_two_dimensional_z_rejected(tiny, tmp_path):
    model, _ = tiny
    path = write_expert(tmp_path / "z.safetensors", {GATE: torch.ones(64, 1)})
    with pytest.raises(E.ModelMismatchError, match=r"\(64, 1\).*\(64,\)"):
        E.apply_expert(model, path)


@pytest.mark.parametrize("key, found", [
    ("model.layers.7.mlp.gate_proj", "no such module"),
    ("model.norm", "RMSNorm"),
    ("model.layers.0.mlp", "MLP"),
])
def test_expert_unknown_module_raises(tiny, tmp_path, key, found):
    model, _ = tiny
    path = write_expert(tmp_path / "z.safetensors", {key: torch.ones(64)})
    with pytest.raises(E.ModelMismatchError, match=found) as error:
        E.apply_expert(model, path)
    assert repr(key) in str(error.value)


def test_expert_empty_or_missing_file(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        E.apply_expert(model, tmp_path / "absent.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(E.ModelMismatchError, match="no z tensors"):
        E.apply_expert(model, tmp_path / "empty.safetensors")


# ---------------------------------------------------------------------------
# Adapters


def write_adapter(path, factors, rank=4, alpha=16.0, extra=None):
    metadata = {"rank": str(rank), "alpha": str(alpha), "method": "lora", "target_modules": json.dumps(list(factors))}
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A, B
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_adapter_adds_scaled_product(tiny, tmp_path):
    model, _ = tiny
    before = weights(model)
    torch.manual_seed(1)
    factors = {GATE: (torch.randn(4, 64), torch.randn(96, 4)), DOWN: (torch.randn(4, 96), torch.randn(64, 4))}
    metadata = E.apply_adapter(model, write_adapter(tmp_path / "a.safetensors", factors, rank=4, alpha=2.0))
    assert metadata["method"] == "lora"
    for name, (A, B) in factors.items():
        expected = before[name + ".weight"] + 0.5 * B @ A
        torch.testing.assert_close(model.get_submodule(name).weight, expected)
    assert torch.equal(model.get_submodule("model.layers.1.mlp.up_proj").weight,
                       before["model.layers.1.mlp.up_proj.weight"])


def test_expert_then_adapter_compose(tiny, tmp_path):
    model, _ = tiny
    W = model.get_submodule(GATE).weight.detach().clone()
    z = torch.linspace(0.5, 1.5, 64)
    A, B = torch.randn(2, 64), torch.randn(96, 2)
    E.apply_expert(model, write_expert(tmp_path / "z.safetensors", {GATE: z}))
    E.apply_adapter(model, write_adapter(tmp_path / "a.safetensors", {GATE: (A, B)}, rank=2, alpha=6.0))
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    expected = U @ torch.diag(s * z.double()) @ Vh + 3.0 * (B @ A).double()
    torch.testing.assert_close(model.get_submodule(GATE).weight.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("A_shape, B_shape, bad, found, expected", [
    ((4, 96), (96, 4), "lora_A", "(4, 96)", "(4, 64)"),
    ((4, 64), (64, 4), "lora_B", "(64, 4)", "(96, 4)"),
    ((8, 64), (96, 8), "lora_A", "(8, 64)", "(4, 64)"),  # rank differs from the metadata
])
def test_adapter_wrong_shape_names_shapes(tiny, tmp_path, A_shape, B_shape, bad, found, expected):
    model, _ = tiny
    before = weights(model)
    path = write_adapter(tmp_path / "a.safetensors", {GATE: (torch.zeros(A_shape), torch.zeros(B_shape))}, rank=4)
    with pytest.raises(E.ModelMismatchError) as error:
        E.apply_adapter(model, path)
    message = str(error.value)
    assert GATE in message
    assert bad in message
    assert found in message
    assert expected in message
    assert all(torch.equal(t, before[n]) for n, t in weights(model).items())


def test_adapter_unknown_keys_raise(tiny, tmp_path):
    model, _ = tiny
    good = (torch.zeros(4, 64), torch.zeros(96, 4))
    path = write_adapter(tmp_path / "a.safetensors", {GATE: good}, extra={"scale": torch.ones(1)})
    with pytest.raises(E.ModelMismatchError, match="unknown key 'scale'"):
        E.apply_adapter(model, path)

    path = write_adapter(tmp_path / "b.safetensors", {"model.layers.5.mlp.gate_proj": good})
    with pytest.raises(E.ModelMismatchError, match="model.layers.5.mlp.gate_proj"):
        E.apply_adapter(model, path)

    save_file({f"{GATE}.lora_A": good[0]}, str(tmp_path / "c.safetensors"), metadata={"rank": "4", "alpha": "8"})
    with pytest.raises(E.ModelMismatchError, match=f"{GATE}.lora_B"):
        E.apply_adapter(model, tmp_path / "c.safetensors")


def test_adapter_without_alpha_raises(tiny, tmp_path):
    model, _ = tiny
    save_file({f"{GATE}.lora_A": torch.zeros(4, 64), f"{GATE}.lora_B": torch.zeros(96, 4)},
              str(tmp_path / "a.safetensors"), metadata={"rank": "4"})
    with pytest.raises(E.ModelMismatchError, match="'alpha'"):
        E.apply_adapter(model, tmp_path / "a.safetensors")


def test_non_finite_values_rejected(tiny, tmp_path):
    model, _ = tiny
    z = torch.ones(64)
    z[3] = float("nan")
    with pytest.raises(E.ModelMismatchError, match="NaN or infinite"):
        E.apply_expert(model, write_expert(tmp_path / "z.safetensors", {GATE: z}))
    B = torch.zeros(96, 4)
    B[0, 0] = float("inf")
    with pytest.raises(E.ModelMismatchError, match="NaN or infinite"):
        E.apply_adapter(model, write_adapter(tmp_path / "a.safetensors", {GATE: (torch.zeros(4, 64), B)}))


# ---------------------------------------------------------------------------
# Command line


def test_unknown_task_rejected_before_loading(tmp_path):
    argv = ["--model", str(tmp_path / "no-model"), "--tasks", "gsm8k,gsm9k", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as error:
        E.main(argv)
    message = str(error.value.code)
    assert "gsm9k" in message
    assert "gsm8k" in message  # the known tasks are listed
    assert "arc_easy" in message
    assert "no-model" not in message  # rejected before any attempt to load the model


@pytest.mark.parametrize("argv, expected", [
    (["--tasks", "gsm8k", "--batch-size", "0", "--out", "r.json"], "--batch-size must be >= 1"),
    (["--model", "m", "--tasks", "gsm8k", "--out", "r.txt"], "--out must name a .json"),
    (["--model", "m", "--out", "r.json"], "nothing to evaluate"),
    (["--model", "m", "--tasks", "gsm8k", "--split", "dev", "--out", "r.json"], "--split must be one of"),
    (["--model", "m", "--tasks", "gsm8k", "--limit", "0", "--out", "r.json"], "--limit must be >= 1"),
    (["--model", "m", "--tasks", "triviaqa", "--out", "r.json"], "score them with --recall N"),
])
def test_invalid_options_raise_clear_errors(argv, expected):
    with pytest.raises(SystemExit, match=expected):
        E.main(argv)


def test_model_defaults_to_smollm2():
    assert E.EvalConfig().model == "smollm2-135m-instruct"


def require_data():
    folder = data_dir()
    if folder is None:
        pytest.skip("real data not found; set PALORA_DATA_DIR to the data folder")
    return folder


def test_empty_split_raises(tmp_path, monkeypatch):
    folder = require_data()
    real_load_splits = tasks.load_splits

    def without_test_items(*args, **kwargs):
        splits = real_load_splits(*args, **kwargs)
        splits.test = []
        return splits

    monkeypatch.setattr(tasks, "load_splits", without_test_items)
    cfg = E.EvalConfig(model="unused", tasks="gsm8k", split="test", data_dir=str(folder), out=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="no items in split 'test'"):
        E.load_eval_sets(cfg)


def test_hub_option_reaches_data_loader(tmp_path, monkeypatch):
    requests = []

    def record_request(name, data_dir=None, seed=0, hub=False):
        requests.append((name, hub))
        raise FileNotFoundError("no data in this test")

    monkeypatch.setattr(tasks, "load_splits", record_request)
    argv = ["--model", "unused", "--tasks", "gsm8k", "--hub", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match="no data in this test"):
        E.main(argv)
    assert requests == [("gsm8k", True)]


def test_cli_end_to_end(tiny_folder, tmp_path):
    folder = require_data()
    torch.manual_seed(0)
    expert = write_expert(tmp_path / "z.safetensors", {GATE: torch.linspace(0.8, 1.2, 64)}, {"task": "basic_arithmetic"})
    adapter = write_adapter(tmp_path / "a.safetensors", {DOWN: (torch.randn(4, 96), 0.01 * torch.randn(64, 4))})
    out = tmp_path / "results" / "run.json"
    E.main([
        "--model", str(tiny_folder), "--expert", str(expert), "--adapter", str(adapter),
        "--tasks", "basic_arithmetic,arc_easy", "--recall", "4", "--limit", "4", "--seed", "1",
        "--data-dir", str(folder), "--batch-size", "3", "--max-new-tokens", "5", "--device", "cpu",
        "--out", str(out),
    ])

    result = json.loads(out.read_text())
    lines = (tmp_path / "results" / "run.predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert set(result["scores"]) == {"basic_arithmetic", "arc_easy", "recall"}
    for key, scores in result["scores"].items():
        mine = [r for r in records if r["task"] == key]
        assert scores["count"] == len(mine) == 4
        assert result["data"][key]["items"] == 4
        assert scores["truncated"] == sum(r["finish_reason"] == "length" for r in mine) / 4
        assert all(r["new_tokens"] <= 5 for r in mine)
    arithmetic = [r for r in records if r["task"] == "basic_arithmetic"]
    assert result["scores"]["basic_arithmetic"]["accuracy"] == sum(r["correct"] for r in arithmetic) / 4
    recall = [r for r in records if r["task"] == "recall"]
    assert result["scores"]["recall"]["em"] == sum(r["em"] for r in recall) / 4
    assert result["scores"]["recall"]["contains"] == sum(r["contains"] for r in recall) / 4

    # The recall items are the first facts of the seeded facts split, the ones injection trains on.
    facts = tasks.load_splits("triviaqa", data_dir=folder, seed=1).train[:4]
    assert [r["id"] for r in recall] == [f.id for f in facts]
    test_split = tasks.load_splits("arc_easy", data_dir=folder, seed=1).test[:4]
    assert [r["id"] for r in records if r["task"] == "arc_easy"] == [e.id for e in test_split]

    config = result["config"]
    assert config["tasks"] == ["basic_arithmetic", "arc_easy"]
    assert config["expert_sha256"] == hashlib.sha256(expert.read_bytes()).hexdigest()
    assert config["adapter_sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert config["expert_metadata"] == {"task": "basic_arithmetic"}
    assert config["seed"] == 1
    assert config["dtype"] == "float32"
    assert config["device"] == "cpu"
    assert result["data"]["arc_easy"]["split"] == "test"
    assert result["data"]["recall"]["task"] == "triviaqa"
    assert result["items_per_s"] > 0
    assert not list((tmp_path / "results").glob("*.tmp*"))


# ---------------------------------------------------------------------------
# Comparison


def write_result(path, scores, expert=None, adapter=None, label=None):
    path.write_text(json.dumps({"label": label, "config": {"expert": expert, "adapter": adapter}, "scores": scores}))
    return str(path)


@pytest.fixture
def result_files(tmp_path):
    base = write_result(tmp_path / "base.json", {
        "gsm8k": {"score": 0.30}, "arc_easy": {"score": 0.50}, "recall": {"em": 0.05, "contains": 0.10}})
    expert = write_result(tmp_path / "expert.json", {
        "gsm8k": {"score": 0.40}, "arc_easy": {"score": 0.0}, "recall": {"em": 0.06, "contains": 0.12}}, expert="z")
    lora = write_result(tmp_path / "lora.json", {
        "gsm8k": {"score": 0.30}, "recall": {"em": 0.60, "contains": 0.8125}},
        expert="z", adapter="a", label="LoRA r16")
    return base, expert, lora


def parse_table(text):
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]
    header, separator, body = rows[0], rows[1], rows[2:]
    assert all(cell == "---" for cell in separator)
    return header, {row[0]: dict(zip(header, row)) for row in body}


def test_compare_auto_detects_expert(result_files, capsys):
    E.main(["--compare", *result_files])
    header, rows = parse_table(capsys.readouterr().out.strip())
    assert header == ["run", "gsm8k", "arc_easy", "recall EM", "recall contains",
                      "retention gsm8k", "retention arc_easy"]
    assert list(rows) == ["base", "expert", "LoRA r16"]
    assert rows["base"]["gsm8k"] == "30.0"
    assert rows["LoRA r16"]["recall contains"] == "81.2"
    assert rows["LoRA r16"]["arc_easy"] == "-"
    assert rows["LoRA r16"]["retention gsm8k"] == "75.0"  # 0.30 / 0.40
    assert rows["base"]["retention gsm8k"] == "75.0"
    assert rows["expert"]["retention gsm8k"] == "100.0"
    assert rows["base"]["retention arc_easy"] == "-"  # the expert scored 0


def test_compare_explicit_or_absent_expert(result_files, tmp_path, capsys):
    base, expert, lora = result_files
    E.main(["--compare", lora, "--expert-result", base])
    header, rows = parse_table(capsys.readouterr().out.strip())
    assert list(rows) == ["LoRA r16"]
    assert rows["LoRA r16"]["retention gsm8k"] == "100.0"  # 0.30 / 0.30

    E.main(["--compare", base, lora])  # no run has an expert alone, so no retention columns
    header, rows = parse_table(capsys.readouterr().out.strip())
    assert header == ["run", "gsm8k", "arc_easy", "recall EM", "recall contains"]
    assert rows["base"]["recall EM"] == "5.0"


def test_compare_averages_runs_that_share_a_label(result_files, tmp_path, capsys):
    base, expert, lora = result_files
    second = write_result(tmp_path / "lora-seed1.json", {
        "gsm8k": {"score": 0.20}, "recall": {"em": 0.70, "contains": 0.9125}},
        expert="z", adapter="a", label="LoRA r16")
    E.main(["--compare", base, expert, lora, second])
    header, rows = parse_table(capsys.readouterr().out.strip())
    assert header[:3] == ["run", "runs", "gsm8k"]
    assert list(rows) == ["base", "expert", "LoRA r16"]
    assert rows["base"]["runs"] == "1"
    assert rows["base"]["gsm8k"] == "30.0"
    assert rows["LoRA r16"]["runs"] == "2"
    # mean and sample standard deviation of 30 and 20; of 81.25 and 91.25
    assert rows["LoRA r16"]["gsm8k"] == "25.0 ± 7.1"
    assert rows["LoRA r16"]["recall contains"] == "86.2 ± 7.1"
    assert rows["LoRA r16"]["retention gsm8k"] == "62.5 ± 17.7"  # 0.75 and 0.50


def test_compare_missing_file_raises(result_files, tmp_path):
    with pytest.raises(SystemExit, match="result file not found: .*missing.json"):
        E.main(["--compare", result_files[0], str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(SystemExit, match="not a result file"):
        E.main(["--compare", str(tmp_path / "other.json")])



def test_length_batches_isolate_a_long_prompt():
    lengths = [100] * 40 + [3754]
    batches = E.length_batches(lengths, batch_size=16, max_new_tokens=384)
    assert batches[0][0] == 40
    assert len(batches[0]) == 3  # 16 * 1024 tokens // (3754 + 384), not 16 padded to 3754
    assert sorted(i for batch in batches for i in batch) == list(range(41))
    assert [len(batch) for batch in batches[1:]] == [16, 16, 6]
