"""The real default model (SmolLM2-135M-Instruct, prepared from its PyPI wheel) against `transformers`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import model as M

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 + 7?",
    "Write one sentence about the ocean.",
]


@pytest.fixture(scope="module")
def pair():
    folder = M.resolve_checkpoint(M.DEFAULT_MODEL)
    ours, tokenizer = M.load_model(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs, tokenizer


def chat_prompts(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]


def test_config_matches_published_architecture(pair):
    cfg = pair[0].config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert (cfg.intermediate_size, cfg.rope_theta, cfg.tie_word_embeddings) == (1536, 100000.0, True)


def test_logits_match_transformers(pair):
    ours, theirs, tokenizer = pair
    batch = tokenizer(chat_prompts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected = theirs(**batch).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_greedy_chat_answers_match_transformers(pair):
    ours, theirs, tokenizer = pair
    answers = M.chat(ours, tokenizer, QUESTIONS, max_new_tokens=48)
    batch = tokenizer(chat_prompts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    out = theirs.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answers == expected
    assert "Paris" in answers[0]
