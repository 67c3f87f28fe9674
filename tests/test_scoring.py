"""The batched scorer equals one-at-a-time scoring and a hand-written full-logits computation."""

import pytest
import torch

from fairforget.scoring import encode, score_continuations, token_logprobs, collate

REQUESTS = [
    ("", "The nurse said that she would be late."),
    ("The doctor walked in.", " He looked tired after a long shift."),
    ("A", " b"),
    ("My neighbour is an engineer.", " She fixed the bridge in a day, which surprised nobody who knew her."),
    ("", "Hi"),
]


@pytest.mark.parametrize("arch", ["llama", "mamba", "gpt2"])
def test_batched_equals_unbatched(tiny_models, tokenizer, arch):
    model = tiny_models[arch]
    batched = score_continuations(model, tokenizer, REQUESTS, batch_size=8)
    single = [score_continuations(model, tokenizer, [r], batch_size=1)[0] for r in REQUESTS]
    for b, s in zip(batched, single):
        assert b.n_tokens == s.n_tokens
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mamba", "gpt2"])
def test_scores_match_full_logits_reference(tiny_models, tokenizer, arch):
    model = tiny_models[arch]
    scores = score_continuations(model, tokenizer, REQUESTS, batch_size=3)
    for (prefix, continuation), score in zip(REQUESTS, scores):
        item = encode(tokenizer, prefix, continuation)
        ids = torch.tensor([item.ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(logprobs[t - 1, item.ids[t]].item() for t in range(item.n_prefix, len(item.ids)))
        assert score.n_tokens == len(item.ids) - item.n_prefix
        assert score.logprob == pytest.approx(expected, abs=1e-4)


def test_empty_prefix_is_conditioned_on_a_special_token(tokenizer):
    item = encode(tokenizer, "", "Hello there")
    assert item.n_prefix == 1
    expected = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert item.ids[0] == expected
    assert item.n_scored == len(tokenizer("Hello there", add_special_tokens=False)["input_ids"])


def test_token_logprobs_gradient_matches_autograd_of_hand_written_loss(tiny_models, tokenizer):
    model = tiny_models["llama"]
    model.zero_grad(set_to_none=True)
    batch = collate([encode(tokenizer, p, c) for p, c in REQUESTS[:3]], tokenizer.pad_token_id)
    sums, counts = token_logprobs(model, **batch)
    (sums / counts).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["target_mask"][:, 1:].float()
    ((logprobs * mask).sum(1) / mask.sum(1)).sum().backward()
    for mine, ref in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


GROUPS = [
    ("The janitor reprimanded the accountant because she made a mistake.",
     "The janitor reprimanded the accountant because he made a mistake."),
    ("The nurse met the farmer and wished him well.", "The nurse met the farmer and wished her well.",
     "The nurse met the farmer and wished them a very pleasant evening indeed."),
    ("Hi", "Hi"),  # identical: each keeps its last token as its own
    ("He left.", "She left early, without a word."),  # differing at the first word
    ("A single sentence with nothing to share.",),
]


@pytest.mark.parametrize("arch", ["llama", "mamba", "gpt2"])
def test_sentence_groups_score_each_sentence_as_it_scores_alone(tiny_models, tokenizer, arch):
    from fairforget.choice_scoring import score_sentence_groups

    model = tiny_models[arch]
    for batch_size in (1, 4, 32):
        grouped = score_sentence_groups(model, tokenizer, GROUPS, batch_size=batch_size)
        assert [len(g) for g in grouped] == [len(g) for g in GROUPS]
        for group, scores in zip(GROUPS, grouped):
            alone = score_continuations(model, tokenizer, [("", s) for s in group], batch_size=1)
            assert [s.n_tokens for s in scores] == [a.n_tokens for a in alone]
            assert [s.logprob for s in scores] == pytest.approx([a.logprob for a in alone], abs=1e-4)
