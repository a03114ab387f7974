"""The hand-written decoder matches `transformers` on tiny random checkpoints."""

import torch
from transformers import AutoModelForCausalLM

import model as M


def load_pair(folder):
    ours, tokenizer = M.load_model(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs, tokenizer


def test_logits_match_transformers(tiny_checkpoint):
    ours, theirs, _ = load_pair(tiny_checkpoint)
    ids = torch.randint(0, ours.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradients_match_transformers(tiny_checkpoint):
    ours, theirs, _ = load_pair(tiny_checkpoint)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ours.requires_grad_(True)
    for logits in (ours(ids), theirs(ids).logits):
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_swiglu_gradient_is_exact():
    gate = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(M.SwiGLU.apply, (gate, up))


def test_left_padded_logits_match_transformers(tiny_checkpoint):
    ours, theirs, tokenizer = load_pair(tiny_checkpoint)
    ids, mask = M.pad_left([[5, 6, 7, 8, 9, 10], [11, 12, 13]], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_batched_greedy_generation_matches_transformers(tiny_checkpoint):
    ours, theirs, tokenizer = load_pair(tiny_checkpoint)
    prompts = ["The quick brown fox", "Hi", "1 + 1 = 2, 2 + 2 ="]
    generations = M.generate(ours, tokenizer, prompts, max_new_tokens=20)

    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    # An EOS-free reference: transformers pads after EOS, our output ends at it.
    out = theirs.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    for g, row in zip(generations, out[:, batch["input_ids"].shape[1] :].tolist()):
        assert g.token_ids == row[: len(g.token_ids)]
        if g.finish_reason == "length":
            assert len(g.token_ids) == 20
        else:
            assert g.token_ids[-1] == tokenizer.eos_token_id


def test_completion_logprobs_match_full_forward(tiny_checkpoint):
    ours, _, _ = load_pair(tiny_checkpoint)
    prompts, completions = [[3, 4, 5, 6], [7, 8]], [[9, 10], [11, 12, 13, 14]]
    logprobs, mask = M.completion_logprobs(ours, prompts, completions)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            full = ours(torch.tensor([p + c])).log_softmax(-1)[0]
        expected = torch.stack([full[len(p) + j - 1, tok] for j, tok in enumerate(c)])
        torch.testing.assert_close(logprobs[i, : len(c)], expected, atol=1e-5, rtol=1e-5)
