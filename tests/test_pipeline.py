"""The four stages end to end on a tiny random model, through their command lines."""

import json

import pytest

import evaluate
import inject
import probe
import svf
from conftest import data_dir, save_tiny_checkpoint

METHODS = ("lora", "oplora", "palora")


@pytest.mark.skipif(data_dir() is None, reason="local data folder not found")
def test_pipeline_end_to_end(tmp_path):
    model = str(save_tiny_checkpoint(tmp_path / "tiny", "llama"))
    run = tmp_path / "run"
    expert, probe_file = run / "svf" / "expert.safetensors", run / "probe.safetensors"

    svf.main(["--model", model, "--task", "basic_arithmetic", "--steps", "2", "--batch-size", "4",
              "--max-new-tokens", "4", "--eval-every", "2", "--eval-size", "4", "--eval-batch-size", "4",
              "--baseline", "none", "--lr", "0.05", "--out", str(run / "svf")])
    probe.main(["--model", model, "--expert", str(expert), "--k", "4", "--out", str(probe_file)])

    scoring = ["--model", model, "--tasks", "basic_arithmetic", "--limit", "4", "--recall", "8",
               "--max-new-tokens", "4", "--expert", str(expert)]
    evaluate.main(scoring + ["--label", "expert", "--out", str(run / "results" / "expert.json")])
    for method in METHODS:
        inject.main(["--model", model, "--method", method, "--expert", str(expert), "--probe", str(probe_file),
                     "--facts", "8", "--epochs", "2", "--batch-size", "4", "--eval-every", "0",
                     "--out", str(run / method)])
        evaluate.main(scoring + ["--adapter", str(run / method / "adapter.safetensors"), "--label", method,
                                 "--out", str(run / "results" / f"{method}.json")])

    results = [str(run / "results" / f"{name}.json") for name in ("expert", *METHODS)]
    table = evaluate.compare(results, expert_path=results[0])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip() for row in rows] == ["expert", *METHODS]
    assert "retention basic_arithmetic" in table

    residual = {m: json.loads((run / m / "summary.json").read_text())["residuals"]["mean"]["two_sided"]
                for m in METHODS}
    assert residual["palora"] < residual["lora"]
    for name in ("expert", *METHODS):
        scores = json.loads((run / "results" / f"{name}.json").read_text())["scores"]
        assert scores["basic_arithmetic"]["count"] == 4
        assert scores["recall"]["count"] == 8
