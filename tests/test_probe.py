"""Probe selection rules, k parsing, the probe file and its spectrum report, on hand-made z and tiny models."""

import json

import pytest
import torch

import model as M
import probe
import svf
from conftest import save_tiny_checkpoint

# Eight components, s descending. z moves components 0 and 6 the most (|z-1| = 0.5), then 1 and 3
# (0.4, 0.3). Component 0 shrinks so much that s * |z| ranks it below components 1 and 2.
S = torch.tensor([10.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5])
Z = torch.tensor([0.5, 1.4, 1.0, 0.7, 1.05, 0.9, 1.5, 1.0])


def select(rule, k, seed=0, module="model.layers.0.mlp.gate_proj"):
    return probe.select_indices(Z, S, k, rule, seed, module).tolist()


def test_svf_rule_picks_largest_shift():
    # |z-1| = [.5, .4, 0, .3, .05, .1, .5, 0]: the tie between 0 and 6 goes to 0 (larger s).
    assert select("svf", 3) == [0, 1, 6]
    assert select("svf", 4) == [0, 1, 3, 6]


def test_top_sigma_rule_uses_expert_singular_values():
    # s * |z| = [5, 11.2, 6, 2.8, 3.15, 1.8, 1.5, 0.5]
    assert select("top-sigma", 3) == [0, 1, 2]
    assert select("top-sigma", 2) == [1, 2]


def test_top_sigma_unit_z_picks_head():
    idx = probe.select_indices(torch.ones(8), S, 3, "top-sigma", 0, "m")
    assert idx.tolist() == [0, 1, 2]


def test_svf_sigma_rule_weighs_shift_by_s():
    # |z-1| * s = [5, 3.2, 0, 1.2, .15, .2, .5, 0]
    assert select("svf-sigma", 2) == [0, 1]
    assert select("svf-sigma", 4) == [0, 1, 3, 6]


def test_random_rule_is_seeded():
    first, again, other = select("random", 4, seed=1), select("random", 4, seed=1), select("random", 4, seed=2)
    assert first == again
    assert first != other
    assert first == sorted(set(first))
    assert all(0 <= i < 8 for i in first)
    assert select("random", 4, seed=1, module="model.layers.1.mlp.up_proj") != first


def test_k_above_rank_names_module_and_rank():
    with pytest.raises(ValueError, match=r"k = 9 exceeds the rank 8 of model\.layers\.0\.mlp\.gate_proj"):
        select("svf", 9)


def test_k_fraction_of_rank():
    assert probe.parse_k("0.25") == 0.25
    assert probe.parse_k("16") == 16
    assert len(select("svf", probe.parse_k("0.5"))) == 4
    assert len(select("svf", probe.parse_k("0.01"))) == 1  # at least one component
    assert len(select("random", probe.parse_k("1.0"))) == 8


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "abc", "0.0"])
def test_bad_k_rejected(text):
    with pytest.raises(ValueError, match="--k"):
        probe.parse_k(text)


def test_spectrum_report_counts_deciles():
    z = {"l.0.mlp.gate_proj": torch.ones(20), "l.0.mlp.down_proj": torch.ones(20)}
    z["l.0.mlp.gate_proj"][19] = 1.2
    selection = {"l.0.mlp.gate_proj": torch.tensor([0, 1, 19]), "l.0.mlp.down_proj": torch.tensor([10])}
    report = probe.spectrum_report(selection, z)
    groups = report["groups"]
    assert groups["gate"]["selected"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert groups["down"]["selected"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert groups["all"]["selected"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert "up" not in groups
    assert groups["gate"]["mean_abs_shift"][9] == pytest.approx(0.1)  # 0.2 over the two components of decile 10
    assert groups["all"]["mean_abs_shift"][9] == pytest.approx(0.05)
    assert groups["all"]["mean_abs_shift"][0] == 0
    assert "gate selected" in probe.format_report(report)


@pytest.fixture
def tiny(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    model, _ = M.load_model(folder)
    return folder, model


def write_expert(path, model, generator_seed=0, **metadata):
    generator = torch.Generator().manual_seed(generator_seed)
    z = {name: 1 + 0.1 * torch.randn(min(m.weight.shape), generator=generator)
         for name, m in svf.target_modules(model).items()}
    M.save_safetensors(z, path, {"task": "basic_arithmetic", **metadata})
    return z


def test_probe_file_holds_selected_columns(tiny, tmp_path):
    folder, model = tiny
    fingerprint = svf.weights_fingerprint(svf.target_modules(model))
    z = write_expert(tmp_path / "expert.safetensors", model, base_fingerprint=fingerprint)
    cache = tmp_path / "svd.safetensors"
    cfg = probe.ProbeConfig(expert=str(tmp_path / "expert.safetensors"), model=str(folder), k="5", select="svf",
                            out=str(tmp_path / "probe.safetensors"), svd_cache=str(cache), device="cpu")
    path = probe.run_probe(cfg)

    svd = svf.load_or_compute_svd(model, cache)
    loaded = probe.load_probe(path)
    assert set(loaded.bases) == set(z)
    for name, (U, s, V) in svd.items():
        idx = loaded.indices[name]
        expected = torch.argsort((z[name] - 1).abs(), descending=True)[:5].sort().values
        assert torch.equal(idx, expected), name
        U_S, V_S = loaded.bases[name]
        assert torch.equal(U_S, U[:, idx]), name
        assert torch.equal(V_S, V[:, idx]), name
    metadata = loaded.metadata
    assert metadata["rule"] == "svf"
    assert metadata["k"] == "5"
    assert metadata["base_fingerprint"] == fingerprint
    assert len(metadata["expert_sha256"]) == 64

    report = json.loads((tmp_path / "probe.spectrum.json").read_text())
    assert sum(report["groups"]["all"]["selected"]) == 5 * len(z)
    assert sum(report["groups"]["gate"]["selected"]) == 5 * model.config.num_hidden_layers


def test_expert_from_other_model_names_shapes(tiny, tmp_path):
    folder, model = tiny
    other = save_tiny_checkpoint(tmp_path / "other", "llama", hidden_size=48)
    other_model, _ = M.load_model(other)
    write_expert(tmp_path / "expert.safetensors", other_model)
    cfg = probe.ProbeConfig(expert=str(tmp_path / "expert.safetensors"), model=str(folder),
                            out=str(tmp_path / "probe.safetensors"), svd_cache=str(tmp_path / "svd.safetensors"))
    with pytest.raises(ValueError, match=r"mlp\.down_proj has shape \(48,\).*64x96 with 64 singular values.*\(64,\)"):
        probe.run_probe(cfg)


def test_expert_from_other_weights_rejected(tiny, tmp_path):
    folder, model = tiny
    write_expert(tmp_path / "expert.safetensors", model, base_fingerprint="0" * 64)
    cfg = probe.ProbeConfig(expert=str(tmp_path / "expert.safetensors"), model=str(folder),
                            out=str(tmp_path / "probe.safetensors"), svd_cache=str(tmp_path / "svd.safetensors"))
    with pytest.raises(ValueError, match="made from base weights 000000000000"):
        probe.run_probe(cfg)


def test_probe_loads_model_in_expert_dtype(tiny, tmp_path):
    folder, _ = tiny
    bf16_model, _ = M.load_model(folder, dtype=torch.bfloat16)
    fingerprint = svf.weights_fingerprint(svf.target_modules(bf16_model))
    hyperparameters = json.dumps({"dtype": "bfloat16"})
    write_expert(tmp_path / "expert.safetensors", bf16_model, base_fingerprint=fingerprint,
                 hyperparameters=hyperparameters)
    cfg = probe.ProbeConfig(expert=str(tmp_path / "expert.safetensors"), model=str(folder), k="2",
                            out=str(tmp_path / "probe.safetensors"), svd_cache=str(tmp_path / "svd.safetensors"))
    path = probe.run_probe(cfg)
    assert probe.load_probe(path).metadata["base_fingerprint"] == fingerprint

    cfg.dtype = "float32"  # a float32 load hashes other values, so the fingerprint check rejects it
    with pytest.raises(ValueError, match="made from base weights"):
        probe.run_probe(cfg)
