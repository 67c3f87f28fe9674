"""Debiasing methods (fairforget.methods): each checked against a result computed independently here."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from fairforget.choice_scoring import option_letter_logprobs, option_logprobs, score_options_separately
from fairforget.methods.bias_unlearn import Weights, kl_to_reference, losses, npo_loss, unlearn
from fairforget.methods.cda import augment, within_token_budget, load_swaps, swap_gender, token_count
from fairforget.methods.self_debias import PREFIXES, SelfDebiasLM
from fairforget.methods.selection import choose, choose_setting, in_budget
from fairforget.methods.task_vector import apply_negation, state_copy, task_vector
from fairforget.methods.lora import add_lora
from fairforget.scoring import collate, conditioning_token_id, encode, score_continuations, token_logprobs

SENTENCES = ["The nurse said that she would help.", "The engineer fixed it because he was asked.",
             "Everyone went home early."]


# ---- CDA --------------------------------------------------------------------------------------------------

@pytest.fixture
def word_lists(tmp_path):
    first = tmp_path / "swaps.txt"
    first.write_text("he \t she \nhim \t her \nhis \t her \nmr. \t mrs. \nactor \t actress\n\n")
    second = tmp_path / "extra.txt"
    second.write_text("cowboy\tcowgirl\n")
    return [first, second]


def test_cda_swaps_a_hand_written_example(word_lists):
    swaps = load_swaps(word_lists)
    text = "He told Mr. Smith that his cowboy friend saw her with the actress. HE left."
    assert swap_gender(text, swaps) == "She told Mrs. Smith that her cowgirl friend saw him with the actor. SHE left."


def test_cda_reads_both_directions_first_pair_wins(word_lists):
    swaps = load_swaps(word_lists)
    assert swaps["she"] == "he" and swaps["cowgirl"] == "cowboy" and swaps["her"] == "him"
    assert swap_gender("Sheila hears history.", swaps) == "Sheila hears history."  # whole words only


def test_cda_on_the_winobias_lists(shared_data):
    swaps = load_swaps([shared_data / "winobias" / "generalized_swaps.txt",
                        shared_data / "winobias" / "extra_gendered_words.txt"])
    assert swap_gender("The waiter thanked his mother.", swaps) == "The waitress thanked her father."


def test_cda_budget_keeps_pairs_whole_and_within_the_plain_budget(word_lists, tokenizer):
    pairs = augment(SENTENCES, load_swaps(word_lists))
    assert pairs[0][1] == "The nurse said that he would help."
    budget = token_count(SENTENCES, tokenizer)
    texts = within_token_budget(pairs, tokenizer, budget, seed=0)
    assert token_count(texts, tokenizer) <= budget
    for a, b in zip(texts[::2], texts[1::2]):
        assert (a, b) in pairs
    used = token_count(texts, tokenizer)
    left_out = [p for p in pairs if p[0] not in texts]
    assert left_out and all(used + token_count(p, tokenizer) > budget for p in left_out)  # nothing else fits


# ---- task-vector negation ---------------------------------------------------------------------------------

def _finetuned_copy(model, seed=1):
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "layers.0." in name or ".h.0." in name:
                p.add_(0.01 * torch.randn_like(p))
    return tuned


def test_task_vector_lambda_zero_returns_the_base_exactly(tiny_models):
    base = tiny_models["llama"]
    theta_0 = state_copy(base)
    tuned = _finetuned_copy(base)
    tau = task_vector(theta_0, state_copy(tuned))
    assert any(torch.count_nonzero(t) for t in tau.values())
    result = apply_negation(tuned, theta_0, tau, 0.0)
    for name, value in result.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, theta_0[name]), name


def test_task_vector_lambda_one_is_two_base_minus_finetuned(tiny_models):
    base = tiny_models["gpt2"]
    theta_0 = state_copy(base)
    tuned = _finetuned_copy(base)
    theta_ft = state_copy(tuned)
    apply_negation(tuned, theta_0, task_vector(theta_0, theta_ft), 1.0)
    name = next(n for n in theta_0 if "h.0.attn.c_attn.weight" in n)
    expected = 2 * theta_0[name] - theta_ft[name]
    assert torch.allclose(tuned.state_dict()[name], expected, atol=1e-7)
    assert not torch.equal(tuned.state_dict()[name], theta_0[name])


# ---- Self-Debias ------------------------------------------------------------------------------------------

def test_self_debias_with_decay_zero_equals_the_plain_scorer(tiny_models, tokenizer):
    model = tiny_models["llama"]
    wrapped = SelfDebiasLM(model, tokenizer, [PREFIXES["gender"]], decay=0.0)
    requests = [("", s) for s in SENTENCES] + [("The doctor came.", " She was late.")]
    plain = score_continuations(model, tokenizer, requests)
    debiased = score_continuations(wrapped, tokenizer, requests)
    for a, b in zip(plain, debiased):
        assert b.n_tokens == a.n_tokens and b.logprob == pytest.approx(a.logprob, abs=1e-4)
    prompts = ["Context: a man and a woman.\nQuestion: who cooks?\nAnswer:",
               "Context: a man and a woman.\nQuestion: who drives?\nAnswer:"]
    options = [[" the man", " the woman", " unknown"], [" the woman", " the man", " cannot tell"]]
    for row_a, row_b in zip(option_logprobs(model, tokenizer, prompts, options),
                            option_logprobs(wrapped, tokenizer, prompts, options)):
        assert [s.logprob for s in row_b] == pytest.approx([s.logprob for s in row_a], abs=1e-4)
    letters_a = option_letter_logprobs(model, tokenizer, prompts)
    letters_b = option_letter_logprobs(wrapped, tokenizer, prompts)
    assert torch.allclose(letters_a, letters_b, atol=1e-4)


def _hand_self_debias(model, tokenizer, sentence, prefix, decay, epsilon=0.01):
    """Summed Self-Debias log-probability of ``sentence`` from two plain forward passes, formula by formula."""
    start = conditioning_token_id(tokenizer)
    ids = [start, *tokenizer(sentence, add_special_tokens=False)["input_ids"]]
    pre = [start, *tokenizer(prefix, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        q = torch.softmax(model(torch.tensor([pre + ids])).logits[0, len(pre):].double(), -1)
    total = 0.0
    for t in range(len(ids) - 1):
        alpha = torch.ones_like(p[t])
        below = p[t] < q[t]
        alpha[below] = torch.clamp(torch.exp(decay * (p[t][below] - q[t][below])), min=epsilon)
        adjusted = alpha * p[t] / (alpha * p[t]).sum()
        total += math.log(float(adjusted[ids[t + 1]]))
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_self_debias_matches_the_formula_by_hand(tiny_models, tokenizer, arch):
    model = tiny_models[arch]
    prefix = PREFIXES["gender"]
    wrapped = SelfDebiasLM(model, tokenizer, [prefix], decay=5000.0)
    score = score_continuations(wrapped, tokenizer, [("", SENTENCES[0])])[0]
    plain = score_continuations(model, tokenizer, [("", SENTENCES[0])])[0]
    expected = _hand_self_debias(model, tokenizer, SENTENCES[0], prefix, 5000.0)
    assert score.logprob == pytest.approx(expected, abs=1e-3)
    assert abs(score.logprob - plain.logprob) > 1e-3  # the adjustment did something


def test_self_debias_shared_prompt_paths_equal_separate_sequences(tiny_models, tokenizer):
    wrapped = SelfDebiasLM(tiny_models["llama"], tokenizer, [PREFIXES["gender"], PREFIXES["age"]], decay=5000.0)
    prompts = ["Context: a man and a woman.\nQuestion: who cooks?\nAnswer:",
               "Context: a man and a woman.\nQuestion: who is old?\nAnswer:"]
    options = [[" the man", " the woman", " unknown"], [" the woman", " the old man", " cannot tell"]]
    shared = option_logprobs(wrapped, tokenizer, prompts, options, batch_size=2)
    separate = score_options_separately(wrapped, tokenizer, prompts, options)
    for row_a, row_b in zip(shared, separate):
        assert [s.logprob for s in row_a] == pytest.approx([s.logprob for s in row_b], abs=1e-4)


# ---- BiasUnlearn ------------------------------------------------------------------------------------------

def test_npo_and_kl_terms_against_hand_computation():
    theta, ref, beta = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), 0.1
    by_hand = -(2 / beta) * sum(math.log(1 / (1 + math.exp(beta * (t - r)))) for t, r in [(-3, -4), (-5, -4.5)]) / 2
    assert float(npo_loss(theta, ref, beta)) == pytest.approx(by_hand, rel=1e-6)
    p_ref, p_theta = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.2, 0.2, 0.6]])
    kl = sum(a * math.log(a / b) for a, b in zip([0.5, 0.3, 0.2], [0.2, 0.2, 0.6]))
    assert float(kl_to_reference(p_theta.log(), p_ref.log())) == pytest.approx(kl, rel=1e-6)


def test_bias_unlearn_losses_at_the_start_model(tiny_models, tokenizer):
    model = add_lora(copy.deepcopy(tiny_models["llama"]), ["q_proj", "v_proj"], seed=0)  # B = 0: equals the base
    forget = collate([encode(tokenizer, "", s) for s in SENTENCES[:2]], tokenizer.pad_token_id)
    retain = collate([encode(tokenizer, "", s.replace("she", "he")) for s in SENTENCES[:2]], tokenizer.pad_token_id)
    terms = losses(model, forget, retain, Weights(forget=1.0, retain=0.5, kl=2.0, beta=0.1))
    sums, counts = token_logprobs(tiny_models["llama"], **retain)
    ce = float(-sums.sum() / counts.sum())
    assert float(terms["npo"]) == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["total"]) == pytest.approx(2 / 0.1 * math.log(2) + 0.5 * ce, rel=1e-5)


def test_bias_unlearn_lowers_the_forget_side(tiny_models, tokenizer):
    model = add_lora(copy.deepcopy(tiny_models["llama"]), ["q_proj", "v_proj", "o_proj"], seed=0)
    adv = [encode(tokenizer, "", s) for s in SENTENCES[:2]]
    dis = [encode(tokenizer, "", s.replace("she", "he").replace(" he ", " she ")) for s in SENTENCES[:2]]
    before = token_logprobs(model, **collate(adv, tokenizer.pad_token_id))[0].sum().item()
    log = unlearn(model, tokenizer.pad_token_id, adv, dis, Weights(retain=0.0, kl=0.0), epochs=5, batch_size=2,
                  lr=5e-3, check_every=0)
    after = token_logprobs(model, **collate(adv, tokenizer.pad_token_id))[0].sum().item()
    assert len(log.steps) == 5 and after < before - 0.1


def test_selection_prefers_the_closest_to_50_within_the_lms_limit():
    rows = [{"lam": 0.0, "distance_from_50": 8.0, "lms": 90.0}, {"lam": 1.0, "distance_from_50": 2.0, "lms": 89.0},
            {"lam": 2.0, "distance_from_50": 0.5, "lms": 80.0}]
    assert choose(rows, "lam", max_lms_drop=2.0, reference=rows[0])["lam"] == 1.0
    assert choose(rows, "lam", max_lms_drop=None, reference=rows[0])["lam"] == 2.0


def test_selection_bounds_perplexity_and_keeps_the_start_when_nothing_is_in_budget():
    """The perplexity bound: +5% allowed (lambda 1 at +4% is kept), +6% is not; with no setting in budget
    choose_setting keeps the start, and without any budget it keeps the closest trained setting."""
    start = {"lam": 0.0, "distance_from_50": 8.0, "lms": 90.0, "perplexity": 20.0}
    mild = {"lam": 1.0, "distance_from_50": 3.0, "lms": 90.0, "perplexity": 20.8}
    damaged = {"lam": 2.0, "distance_from_50": 0.5, "lms": 90.0, "perplexity": 21.2}
    assert in_budget(mild, start, 2.0, 5.0) and not in_budget(damaged, start, 2.0, 5.0)
    assert in_budget(damaged, start, 2.0, None) and in_budget({"lms": 89.0}, start, 2.0, 5.0)  # no perplexity
    assert choose([start, mild, damaged], "lam", 2.0, start, 5.0) is mild
    assert choose([start, mild, damaged], "lam", 2.0, start, None) is damaged

    def cfg(lms, ppl):
        return SimpleNamespace(max_lms_drop=lms, max_ppl_increase=ppl)

    assert choose_setting([start, damaged], "lam", cfg(2.0, 5.0)) is start
    assert choose_setting([start, damaged], "lam", cfg(None, 5.0)) is start
    assert choose_setting([start, damaged], "lam", cfg(None, None)) is damaged
