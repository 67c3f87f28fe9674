"""Neutral held-out texts and perplexity: disjoint halves, no gendered words, exp of the mean token NLL."""

import math

import torch

from fairforget.evals.perplexity import GENDERED, load_neutral_texts, perplexity, perplexity_change


def test_neutral_halves_are_disjoint_fixed_and_ungendered():
    heldout, retain = load_neutral_texts("heldout"), load_neutral_texts("retain")
    assert heldout and retain and not set(heldout) & set(retain)
    assert sorted(heldout + retain) == sorted(load_neutral_texts("all"))
    assert load_neutral_texts("heldout", limit=5) == heldout[:5]
    assert not any(GENDERED.search(t) for t in heldout + retain)
    assert not GENDERED.search("The interpreter evaluates the expression.") and GENDERED.search("She said so.")


def test_perplexity_is_exp_of_mean_token_nll(tiny_models, tokenizer):
    model = tiny_models["llama"]
    texts = load_neutral_texts("heldout", limit=4)
    result = perplexity(model, tokenizer, texts, batch_size=3, n_boot=50)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # independent: one text at a time, full logits
            ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id] + tokenizer(text)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    assert result["n_tokens"] == count
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-4)
    low, high = result["perplexity_ci"]
    assert low <= result["perplexity"] <= high
    same = perplexity_change(result, result, n_boot=20)
    assert same["ppl_change_pct"] == 0.0


def test_registered_perplexity_compares_its_items_as_the_paired_relative_change(tiny_models, tokenizer):
    from fairforget.evals.registry import EVALUATIONS
    from fairforget.tiny import build_tiny_model

    ev, texts = EVALUATIONS["perplexity"], load_neutral_texts("heldout", limit=5)
    before, before_items = ev.evaluate(tiny_models["llama"], tokenizer, texts, batch_size=2, n_boot=30, seed=0)
    after, after_items = ev.evaluate(build_tiny_model("llama", tokenizer, seed=5), tokenizer, texts, batch_size=2,
                                     n_boot=30, seed=0)
    assert [it["nll"] for it in before_items] == before["per_text_nll"] and len(after_items) == 5
    comparison = ev.compare(before_items, after_items, n_boot=30, seed=0)
    by_hand = 100 * (math.exp((sum(after["per_text_nll"]) - sum(before["per_text_nll"])) / before["n_tokens"]) - 1)
    assert comparison["n_common"] == 5 and math.isclose(comparison["overall"]["ppl_change_pct"], by_hand, rel_tol=1e-9)
    assert comparison["overall"] == perplexity_change(before, after, n_boot=30, seed=0)
