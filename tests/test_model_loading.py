"""Loader checks: bad checkpoints get clear errors; generation options behave."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from conftest import save_tiny_checkpoint


@pytest.fixture
def llama_folder(tmp_path):
    return save_tiny_checkpoint(tmp_path / "llama", "llama")


def rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(M.CheckpointError, match="no-such-model"):
        M.load_model(missing)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.CheckpointError, match="no config.json"):
        M.load_model(tmp_path / "empty")


def test_unsupported_model_type_lists_supported(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["model_type"] = "gemma"
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gemma'.*llama, mistral, qwen2"):
        M.load_model(llama_folder)


def test_missing_tensor_is_named(llama_folder):
    rewrite_weights(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(M.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        M.load_model(llama_folder)


def test_unexpected_tensor_is_named(llama_folder):
    rewrite_weights(llama_folder, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(M.CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        M.load_model(llama_folder)


def test_shape_mismatch_names_both_shapes(llama_folder):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()

    rewrite_weights(llama_folder, shrink)
    with pytest.raises(M.CheckpointError, match=r"down_proj.weight.*\(64, 10\).*\(64, 96\)"):
        M.load_model(llama_folder)


def test_truncated_safetensors(llama_folder):
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        M.load_model(llama_folder)


def test_sharded_checkpoint_loads(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(llama_folder)
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(llama_folder / "tokenizer.json", sharded)
    shutil.copy(llama_folder / "tokenizer_config.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    ours, _ = M.load_model(sharded)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_parameters_load_frozen_in_requested_dtype(llama_folder):
    ours, _ = M.load_model(llama_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())


def test_sliding_window_overflow_is_rejected(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "mistral", "mistral", sliding_window=16)
    ours, _ = M.load_model(folder)
    with pytest.raises(ValueError, match="sliding_window=16"):
        ours(torch.zeros(1, 17, dtype=torch.long))


def test_stop_string_ends_each_sequence_alone(llama_folder):
    ours, tokenizer = M.load_model(llama_folder)
    free = M.generate(ours, tokenizer, ["abc", "xyz"], max_new_tokens=12)
    # Stop on a piece that the first sequence produces unconstrained.
    piece = free[0].text[2:4]
    stopped = M.generate(ours, tokenizer, ["abc", "xyz"], max_new_tokens=12, stop=(piece,))
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].text == free[0].text[: free[0].text.find(piece)]
    if piece not in free[1].text:
        assert stopped[1].token_ids == free[1].token_ids


def test_sampling_is_seeded_and_top_p_narrows(llama_folder):
    ours, tokenizer = M.load_model(llama_folder)

    def sample(seed, top_p):
        g = torch.Generator().manual_seed(seed)
        return M.generate(ours, tokenizer, ["hello"] * 4, max_new_tokens=8, temperature=1.0, top_p=top_p, generator=g)

    first, again = sample(0, 1.0), sample(0, 1.0)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    greedy = M.generate(ours, tokenizer, ["hello"], max_new_tokens=8)[0].token_ids
    # A tiny nucleus keeps only the top token, which is greedy decoding.
    assert all(g.token_ids == greedy for g in sample(1, 1e-6))


def test_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(M.sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}


def test_mistyped_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(M.CheckpointError, match="model path not found: 'runs/mymodel'"):
        M.resolve_checkpoint("runs/mymodel")
