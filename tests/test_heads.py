"""Head capture, soft-pruning, correlation and protection against hand computations on tiny random models."""

import copy

import numpy as np
import pytest
import torch

from fairforget.errors import FairforgetError
from fairforget.heads import (batch_prompts, context_influence, head_correlations, head_hooks, head_layout,
                              letter_logprobs_and_heads, protect_heads, pruning_cost, scale_heads)

PROMPTS = ["The nurse said that she would be late. Answer:", "Who fixed the bridge? A. He B. She Answer:",
           "Hi"]
LETTERS = ("A", "B", "C")


def manual_llama_heads(model, layer, x):
    """Per-head attention outputs [seq, heads, head_dim] of one Llama layer, written out by hand (GQA)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[layer].self_attn
    cfg = model.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // n_q
    seq = x.shape[0]
    q = (x @ attn.q_proj.weight.T).view(seq, n_q, d).transpose(0, 1)
    k = (x @ attn.k_proj.weight.T).view(seq, n_kv, d).transpose(0, 1)
    v = (x @ attn.v_proj.weight.T).view(seq, n_kv, d).transpose(0, 1)
    cos, sin = model.model.rotary_emb(x[None], torch.arange(seq)[None])
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    q, k = q[0], k[0]
    out = torch.empty(seq, n_q, d)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for h in range(n_q):
        g = h // (n_q // n_kv)  # the KV head this query head shares
        scores = (q[h] @ k[g].T) / d ** 0.5
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out[:, h] = weights @ v[g]
    return out


def layer_inputs(model, ids):
    """Normalised inputs of every layer's attention, and every attention module's output."""
    inputs, outputs, handles = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o[0])))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0][0])))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return inputs, outputs


def test_layout_of_tiny_llama_is_grouped_query(tiny_models):
    layout = head_layout(tiny_models["llama"])
    assert layout.shape == (2, 4) and layout.head_dim == 16 and layout.out_proj_name == "o_proj"
    assert tiny_models["llama"].config.num_key_value_heads == 2


def test_hook_capture_equals_manual_head_outputs(tiny_models, tokenizer):
    model = tiny_models["llama"]
    layout = head_layout(model)
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    inputs, _ = layer_inputs(model, ids)
    captured = {}
    with torch.no_grad(), head_hooks(layout, on_heads=lambda l, x: captured.__setitem__(l, x[0].clone())):
        model(ids)
    for layer in range(2):
        expected = manual_llama_heads(model, layer, inputs[layer])
        torch.testing.assert_close(captured[layer], expected, atol=1e-5, rtol=1e-4)


def test_last_position_capture_with_padding_equals_single_rows(tiny_models, tokenizer):
    model = tiny_models["llama"]
    layout = head_layout(model)
    variants = [[32, 33], [34], [35, 36]]
    with torch.no_grad():
        letters, heads = letter_logprobs_and_heads(model, layout, batch_prompts(tokenizer, PROMPTS, "cpu"), variants)
        for row, prompt in enumerate(PROMPTS):
            _, one_heads = letter_logprobs_and_heads(model, layout, batch_prompts(tokenizer, [prompt], "cpu"), variants)
            torch.testing.assert_close(heads[row], one_heads[0], atol=1e-5, rtol=1e-4)
            full = torch.log_softmax(model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1], -1)
            expected = torch.stack([full[v].exp().sum().log() for v in variants])
            torch.testing.assert_close(letters[row], expected, atol=1e-4, rtol=1e-4)
    assert heads.shape == (3, 2, 4, 16)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_scaling_by_one_removes_exactly_that_head(tiny_models, tokenizer, layer, head):
    base = tiny_models["llama"]
    model = copy.deepcopy(base)
    strengths = torch.zeros(2, 4)
    strengths[layer, head] = 1.0
    scale_heads(model, strengths)
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    inputs, outputs = layer_inputs(model, ids)
    manual = manual_llama_heads(base, layer, inputs[layer])  # q/k/v untouched, so the heads are the base ones
    wo = base.model.layers[layer].self_attn.o_proj.weight
    keep = [h for h in range(4) if h != head]
    expected = sum(manual[:, h] @ wo[:, h * 16:(h + 1) * 16].T for h in keep)
    torch.testing.assert_close(outputs[layer], expected, atol=1e-5, rtol=1e-4)


def test_scaling_touches_only_that_heads_slice(tiny_models):
    base = tiny_models["llama"]
    model = copy.deepcopy(base)
    strengths = torch.zeros(2, 4)
    strengths[1, 2] = 0.3
    scale_heads(model, strengths)
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == ["model.layers.1.self_attn.o_proj.weight"]
    w0, w1 = before[changed[0]], after[changed[0]]
    torch.testing.assert_close(w1[:, 32:48], 0.7 * w0[:, 32:48])
    assert torch.equal(w1[:, :32], w0[:, :32]) and torch.equal(w1[:, 48:], w0[:, 48:])


def test_gpt2_conv1d_rows_are_scaled_and_equal_gating(tiny_models, tokenizer):
    base = tiny_models["gpt2"]
    layout = head_layout(base)
    assert layout.shape == (2, 4) and layout.out_proj_name == "c_proj"
    model = copy.deepcopy(base)
    strengths = torch.zeros(2, 4)
    strengths[0, 1], strengths[1, 0] = 1.0, 0.25
    scale_heads(model, strengths)
    w0, w1 = base.transformer.h[0].attn.c_proj.weight, model.transformer.h[0].attn.c_proj.weight
    assert torch.equal(w1[16:32], torch.zeros_like(w1[16:32])) and torch.equal(w1[:16], w0[:16])
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad(), head_hooks(layout, gates=1 - strengths):
        gated = base(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gated, atol=1e-5, rtol=1e-4)


def test_mamba_has_no_heads(tiny_models):
    with pytest.raises(FairforgetError, match="no attention heads"):
        head_layout(tiny_models["mamba"])


def test_correlation_equals_numpy():
    gen = torch.Generator().manual_seed(0)
    activity = torch.randn(20, 3, 5, generator=gen)
    activity[:, 2, 4] = 1.0  # a constant head
    target = torch.randn(20, generator=gen) + activity[:, 0, 0]
    r = head_correlations(activity, target)
    for layer in range(3):
        for head in range(5):
            if (layer, head) == (2, 4):
                assert r[layer, head] == 0
                continue
            expected = np.corrcoef(activity[:, layer, head].numpy(), target.numpy())[0, 1]
            assert r[layer, head].item() == pytest.approx(expected, abs=1e-6)


def test_correlation_pvalues_match_scipy():
    from scipy.stats import pearsonr

    from fairforget.heads import correlation_pvalues

    gen = torch.Generator().manual_seed(1)
    activity = torch.randn(15, 2, 3, generator=gen)
    target = torch.randn(15, generator=gen) + 0.5 * activity[:, 1, 2]
    p = correlation_pvalues(head_correlations(activity, target), 15)
    for layer in range(2):
        for head in range(3):
            expected = pearsonr(activity[:, layer, head].numpy(), target.numpy()).pvalue
            assert p[layer, head].item() == pytest.approx(expected, rel=1e-4)


def test_context_influence_is_kl():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.3, 0.3, 0.4], [0.2, 0.3, 0.5]])
    from scipy.stats import entropy

    expected = [entropy(p[0].numpy(), q[0].numpy()), 0.0]
    assert context_influence(p, q).tolist() == pytest.approx(expected, abs=1e-6)


def test_pruning_cost_matches_finite_difference(tiny_models, tokenizer):
    model = tiny_models["llama"]
    layout = head_layout(model)
    batch = batch_prompts(tokenizer, PROMPTS, "cpu")
    gold = torch.tensor([0, 2, 1])
    from fairforget.choice_scoring import letter_token_ids

    letter_ids = letter_token_ids(tokenizer, LETTERS)
    s = 1e-3
    cost = pruning_cost(model, layout, [batch], [gold], letter_ids, torch.full((2, 4), s, dtype=torch.float64))

    def loss(m):
        with torch.no_grad():
            logprobs, _ = letter_logprobs_and_heads(m, None, batch, letter_ids)
        return torch.nn.functional.cross_entropy(logprobs.double(), gold).item()

    base_loss = loss(model)
    for layer, head in [(0, 0), (1, 3)]:
        pruned = copy.deepcopy(model)
        strengths = torch.zeros(2, 4)
        strengths[layer, head] = s
        scale_heads(pruned, strengths)
        assert cost[layer, head].item() == pytest.approx(loss(pruned) - base_loss, rel=0.05, abs=1e-7)


def test_protect_heads_unselects_the_costliest():
    strengths = torch.tensor([[0.5, 0.0, 0.1], [0.9, 0.1, 0.0]], dtype=torch.float64)
    cost = torch.tensor([[0.2, 9.0, -1.0], [0.5, 0.1, 3.0]], dtype=torch.float64)
    out, protected = protect_heads(strengths, cost, 2)
    assert protected == [(1, 0), (0, 0)]
    assert out.tolist() == [[0.0, 0.0, 0.1], [0.0, 0.1, 0.0]]


def test_saved_pruned_model_reloads_with_same_outputs(tiny_models, tokenizer, tmp_path):
    from fairforget.models import load_model

    model = copy.deepcopy(tiny_models["llama"])
    strengths = torch.zeros(2, 4)
    strengths[0, 2], strengths[1, 1] = 1.0, 0.5
    scale_heads(model, strengths)
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    loaded = load_model(str(tmp_path / "pruned"), "cpu")
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
        assert not torch.allclose(tiny_models["llama"](ids).logits, model(ids).logits)


def test_head_activity_matches_scorer_and_direct_capture(tiny_models, tokenizer):
    from fairforget.choice_scoring import option_letter_probs
    from fairforget.heads import head_activity

    model = tiny_models["llama"]
    full = [p + " (full)" for p in PROMPTS]
    question = PROMPTS
    result = head_activity(model, tokenizer, full, question, LETTERS, batch_size=2)
    torch.testing.assert_close(result.p_full, option_letter_probs(model, tokenizer, full, LETTERS), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.p_question, option_letter_probs(model, tokenizer, question, LETTERS),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.influence, context_influence(result.p_full, result.p_question))
    layout = head_layout(model)
    for row in range(len(PROMPTS)):
        captured = {}
        for name, text in (("full", full[row]), ("question", question[row])):
            store = {}
            with torch.no_grad(), head_hooks(layout, on_heads=lambda l, x: store.__setitem__(l, x[0, -1].clone())):
                model(torch.tensor([tokenizer(text)["input_ids"]]))
            captured[name] = torch.stack([store[l] for l in range(2)])
        torch.testing.assert_close(result.norm[row], captured["full"].norm(dim=-1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.delta[row], (captured["full"] - captured["question"]).norm(dim=-1),
                                   atol=1e-5, rtol=1e-4)


# ---- head choice, random control, StereoSet contributions, cyclic letter permutations -----------------------

def signal_of(score, p):
    from fairforget.methods.head_pruning import HeadSignal

    return HeadSignal("test", torch.tensor(score, dtype=torch.float64), torch.tensor(p, dtype=torch.float64), 10, "")


def test_top_k_selection_signed_and_unsigned_by_hand():
    from fairforget.methods.head_pruning import select_heads

    signal = signal_of([[0.5, -0.9, 0.1], [0.3, 0.2, -0.4]], [[0.5] * 3] * 2)
    signed = select_heads(signal, "top-k", 2, 0.1, True, 0.8)  # the two largest scores: 0.5 and 0.3
    assert signed.tolist() == [[0.8, 0.0, 0.0], [0.8, 0.0, 0.0]]
    unsigned = select_heads(signal, "top-k", 3, 0.1, False, 1.0)  # |score|: 0.9, 0.5, 0.4
    assert unsigned.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert select_heads(signal, "top-k", 0, 0.1, True, 1.0).sum() == 0
    with pytest.raises(FairforgetError, match="--k"):
        select_heads(signal, "top-k", 7, 0.1, True, 1.0)


def test_fdr_selection_is_benjamini_hochberg_by_hand():
    from fairforget.methods.head_pruning import benjamini_hochberg, select_heads

    # sorted p: 0.001 0.008 0.039 0.041 0.2 0.9; BH thresholds at q=0.1, m=6: k*q/m = 0.0167 0.033 0.05 0.067 ...
    # the largest k with p_(k) <= k*q/m is k=4 (0.041 <= 0.0667), so the four smallest are discoveries
    p = [[0.039, 0.9, 0.001], [0.2, 0.041, 0.008]]
    assert benjamini_hochberg(torch.tensor(p), 0.1).tolist() == [[True, False, True], [False, True, True]]
    # at q = 0.02 only p <= k*0.02/6: 0.001 <= 0.0033 (k=1), 0.008 > 0.0067 (k=2): one discovery
    assert benjamini_hochberg(torch.tensor(p), 0.02).tolist() == [[False, False, True], [False, False, False]]
    # signed: one-sided p = p/2 for a positive score, 1 - p/2 otherwise
    score = [[1.0, 1.0, -1.0], [1.0, 1.0, 1.0]]
    chosen = select_heads(signal_of(score, p), "fdr", 0, 0.1, True, 0.5)
    assert chosen.tolist() == [[0.5, 0.0, 0.0], [0.0, 0.5, 0.5]]  # the negative head (p 0.001) is not chosen


def test_random_control_keeps_the_count_and_strength_multiset():
    from fairforget.methods.head_pruning import random_draws, random_like

    strengths = torch.zeros(30, 9, dtype=torch.float64)
    strengths[0, 1], strengths[4, 4], strengths[7, 2], strengths[29, 8] = 1.0, 0.5, 0.5, 0.25
    draws = random_draws(strengths, seed=3, n=6)
    for draw in draws:
        assert sorted(draw.flatten().tolist()) == sorted(strengths.flatten().tolist())
        assert int((draw > 0).sum()) == 4
    assert len({tuple(torch.nonzero(d).flatten().tolist()) for d in draws}) == 6  # different heads each draw
    assert torch.equal(random_like(strengths, 3000), draws[0])  # seeded: draw d of seed s is seed s*1000 + d


def test_stereoset_contributions_match_finite_differences(tiny_models, tokenizer):
    from fairforget.methods.head_pruning import stereoset_contributions
    from fairforget.scoring import score_continuations
    from fairforget.evals.stereoset import Example, scoring_requests

    examples = [Example("a", "intrasentence", "gender", "nurse", "The nurse said BLANK was tired.",
                        {"stereotype": ("1", "The nurse said she was tired."),
                         "anti-stereotype": ("2", "The nurse said he was tired."),
                         "unrelated": ("3", "The nurse said cat was tired.")}),
                Example("b", "intersentence", "gender", "engineer", "The engineer fixed it.",
                        {"stereotype": ("4", "He was proud of his work."),
                         "anti-stereotype": ("5", "She was proud of her work and smiled."),
                         "unrelated": ("6", "Bananas are yellow.")})]
    model = copy.deepcopy(tiny_models["llama"])
    c = stereoset_contributions(model, tokenizer, examples, batch_size=2)
    assert all(p.requires_grad for p in model.parameters())  # weights left trainable as they were
    layout = head_layout(model)

    def log_odds(gates):
        b = []
        with head_hooks(layout, gates):  # gating a head's output = scaling its slice (tested above)
            for ex in examples:
                req = {label: (prefix, cont) for label, prefix, cont in scoring_requests(ex)}
                s = score_continuations(model, tokenizer, [req["stereotype"], req["anti-stereotype"]])
                b.append(s[0].mean - s[1].mean)
        return torch.tensor(b, dtype=torch.float64)

    eps = 0.05  # central differences: error O(eps^2), well above float32 rounding of the log-probabilities
    for layer, head in [(0, 2), (1, 1)]:
        up, down = torch.ones(2, 4), torch.ones(2, 4)
        up[layer, head], down[layer, head] = 1 + eps, 1 - eps
        measured = (log_odds(up) - log_odds(down)) / (2 * eps)
        torch.testing.assert_close(c[:, layer, head], measured, rtol=0.05, atol=2e-4)


def test_cyclic_permutations_average_the_three_orders_by_hand(tiny_models, tokenizer):
    from fairforget.evals.bbq import Example
    from fairforget.evals.bbq_eval import build_prompt, evaluate_bbq, option_order
    from fairforget.choice_scoring import option_letter_probs

    examples = [Example("Age", i, 1, "neg", cond, "A grandson and a grandfather met." + " x" * i, "Who forgot?",
                        ("the grandson", "the grandfather", "Unknown"), ("nonOld", "old", "unknown"), label, 1, 2)
                for i, (cond, label) in enumerate([("ambig", 2), ("disambig", 1), ("disambig", 0)])]
    model = tiny_models["llama"]
    metrics, items = evaluate_bbq(model, tokenizer, examples, "letter", "off", batch_size=2, n_boot=5,
                                  permutations="cyclic")
    assert metrics["permutations"] == "cyclic"
    for e, item in zip(examples, items):
        base = option_order(e, 0)
        expected = torch.zeros(3)
        for shift in range(3):
            shown = base[shift:] + base[:shift]  # shown[j]: original answer at letter j
            probs = option_letter_probs(model, tokenizer, [build_prompt(e, shown)], "ABC")[0]
            for j, original in enumerate(shown):
                expected[original] += probs[j] / 3
        torch.testing.assert_close(torch.tensor(item["option_probs"]), expected, atol=1e-5, rtol=1e-4)
        assert item["pred"] == int(expected.argmax())
    _, plain = evaluate_bbq(model, tokenizer, examples, "letter", "off", batch_size=2, n_boot=5)
    for e, item in zip(examples, plain):  # without permutations: the single shown order
        probs = option_letter_probs(model, tokenizer, [build_prompt(e, option_order(e, 0))], "ABC")[0]
        expected = torch.zeros(3)
        expected[list(option_order(e, 0))] = probs
        torch.testing.assert_close(torch.tensor(item["option_probs"]), expected, atol=1e-5, rtol=1e-4)


def test_answer_mode_head_activity_uses_the_answer_scorer(tiny_models, tokenizer):
    from fairforget.choice_scoring import option_logprobs
    from fairforget.heads import head_activity

    model = tiny_models["llama"]
    full = [p + " (full)" for p in PROMPTS]
    options = [[" yes", " no", " maybe not"]] * len(PROMPTS)
    result = head_activity(model, tokenizer, full, PROMPTS, LETTERS, batch_size=2, options=options)
    for name, prompts in (("p_full", full), ("p_question", PROMPTS)):
        means = torch.tensor([[s.mean for s in row] for row in option_logprobs(model, tokenizer, prompts, options)])
        torch.testing.assert_close(getattr(result, name), torch.softmax(means, -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.influence, context_influence(result.p_full, result.p_question))


def test_pruned_context_restores_the_weights(tiny_models):
    from fairforget.heads import pruned

    model = copy.deepcopy(tiny_models["llama"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    strengths = torch.zeros(2, 4)
    strengths[1, 3] = 1.0
    with pruned(model, strengths):
        assert torch.equal(model.model.layers[1].self_attn.o_proj.weight[:, 48:64], torch.zeros(64, 16))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
