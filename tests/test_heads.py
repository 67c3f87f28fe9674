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
