"""Projection methods (SentenceDebias, INLP, LEACE) folded into the LM head, each against an independent computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fairforget.artifacts import read_json, save_model
from fairforget.methods.projection import (CONFIG_KEY, GenderedPair, extract, fit, fitting_pairs, fold,
                                           inlp_directions, leace_eraser, leace_projection, record_in_config,
                                           untie_head)
from fairforget.models import load_model
from fairforget.scoring import BodyOutputs, reused_body_outputs, score_continuations
from fairforget.tiny import build_tiny_model

PAIRS = [GenderedPair("The nurse said that he would be late for the meeting.",
                      "The nurse said that she would be late for the meeting.", "test"),
         GenderedPair("My father drove his car to the station.", "My mother drove her car to the station.", "test"),
         GenderedPair("The engineer thanked him for the help.", "The engineer thanked her for the help.", "test"),
         GenderedPair("Every boy in the class wrote a poem.", "Every girl in the class wrote a poem.", "test"),
         GenderedPair("The king spoke to his people.", "The queen spoke to her people.", "test"),
         GenderedPair("He is a doctor at the hospital.", "She is a doctor at the hospital.", "test")]
SENTENCES = ["The surgeon finished the operation and went home.", "She thanked the mechanic for the repair.",
             "A young man and an old woman met at the market on a sunny morning."]


def _logits(model, tokenizer, texts=SENTENCES) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits


def _head_inputs(model, tokenizer, text: str) -> np.ndarray:
    """The LM head's input at every position of ``text`` after the conditioning token, captured by a hook."""
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[start] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    return captured[0][0].double().numpy(), ids[0].tolist()


def _models(tiny_models, tokenizer):
    """Tied tiny Llama and untied tiny GPT-2."""
    untied = build_tiny_model("gpt2", tokenizer, seed=1, tie_word_embeddings=False)
    assert tiny_models["llama"].config.tie_word_embeddings and not untied.config.tie_word_embeddings
    return {"llama (tied)": tiny_models["llama"], "gpt2 (untied)": untied}


@pytest.mark.parametrize("method", ["sentence_debias", "inlp", "leace"])
def test_zero_strength_returns_every_logit_exactly(tiny_models, tokenizer, tmp_path, method):
    base = tiny_models["llama"]
    model = copy.deepcopy(base)
    projection_at = fit(method, extract(model, tokenizer, PAIRS), 2 if method != "leace" else 1.0)
    start_weight, tied = untie_head(model)
    fold(model, start_weight, projection_at(0))
    assert tied and torch.equal(_logits(model, tokenizer), _logits(base, tokenizer))
    assert not torch.equal(fold(copy.deepcopy(model), start_weight, projection_at(1)).lm_head.weight, start_weight)
    save_model(model, tokenizer, tmp_path / "m")
    assert torch.equal(_logits(load_model(str(tmp_path / "m"), "cpu").model, tokenizer), _logits(base, tokenizer))


@pytest.mark.parametrize("which", ["llama (tied)", "gpt2 (untied)"])
def test_folded_model_equals_the_projection_hooked_on_the_final_hidden_state(tiny_models, tokenizer, tmp_path, which):
    base = _models(tiny_models, tokenizer)[which]
    embeddings = base.get_input_embeddings().weight.detach().clone()
    # The hook applies the concept-erasure eraser itself, blended: h + alpha (eraser(h) - h). Its projection is
    # oblique (P != P^T), so a transposed fold would not pass, nor one that dropped an affine term.
    reps = extract(base, tokenizer, PAIRS)
    eraser = leace_eraser(reps.tokens, reps.labels)
    projection = leace_projection(eraser, 0.8)
    assert (projection - projection.T).abs().max() > 1e-3

    def erase(_, args):
        h = args[0].double()
        return ((h + 0.8 * (eraser(h) - h)).to(args[0].dtype),)

    handle = base.get_output_embeddings().register_forward_pre_hook(erase)
    hooked = _logits(base, tokenizer)
    handle.remove()
    model = copy.deepcopy(base)
    start_weight, tied = untie_head(model)
    fold(model, start_weight, projection)
    record_in_config(model, "leace", 0.8, tied)
    assert (hooked - _logits(base, tokenizer)).abs().max() > 1e-3  # the projection changes the logits
    assert (_logits(model, tokenizer) - hooked).abs().max() <= 1e-5
    save_model(model, tokenizer, tmp_path / "m")
    config = read_json(tmp_path / "m" / "config.json")
    assert config["tie_word_embeddings"] is False and config[CONFIG_KEY]["untied_lm_head"] is (which == "llama (tied)")
    reloaded = load_model(str(tmp_path / "m"), "cpu").model
    assert (_logits(reloaded, tokenizer) - hooked).abs().max() <= 1e-5
    assert torch.equal(reloaded.get_input_embeddings().weight, embeddings)


def test_reused_body_outputs_score_each_strength_as_a_fresh_fold_would(tiny_models, tokenizer):
    base = tiny_models["gpt2"]
    projection_at = fit("sentence_debias", extract(base, tokenizer, PAIRS), 2)
    requests = [("", s) for s in SENTENCES] + [("The doctor came.", " She was late.")]
    model = copy.deepcopy(base)
    start_weight, _ = untie_head(model)
    calls = []
    real_forward = model.transformer.forward
    model.transformer.forward = lambda *args, **kwargs: calls.append(1) or real_forward(*args, **kwargs)
    reused = {}
    with reused_body_outputs(model):
        for k in (0, 1, 2):
            reused[k] = [s.logprob for s in score_continuations(fold(model, start_weight, projection_at(k)), tokenizer,
                                                                requests, batch_size=2)]
    assert len(calls) == 2  # two batches, the body run once each
    for k in (0, 1, 2):
        fresh = copy.deepcopy(base)
        fold(fresh, untie_head(fresh)[0], projection_at(k))
        assert reused[k] == [s.logprob for s in score_continuations(fresh, tokenizer, requests, batch_size=2)]
    assert reused[0] != reused[2]


def test_sentence_debias_removes_the_top_singular_directions_of_the_difference_matrix(tiny_models, tokenizer):
    model = tiny_models["llama"]
    rows = []
    for pair in PAIRS:
        (male, male_ids), (female, female_ids) = (_head_inputs(model, tokenizer, pair.male),
                                                  _head_inputs(model, tokenizer, pair.female))
        first = next(i for i, (a, b) in enumerate(zip(male_ids, female_ids)) if a != b)
        rows.append(male[first:].mean(axis=0) - female[first:].mean(axis=0))
    _, _, vt = np.linalg.svd(np.array(rows), full_matrices=False)
    projection_at = fit("sentence_debias", extract(model, tokenizer, PAIRS), 3)
    for k in (1, 3):
        expected = np.eye(vt.shape[1]) - vt[:k].T @ vt[:k]
        assert np.abs(projection_at(k).numpy() - expected).max() < 1e-5


def _probe_accuracy(x_train, y_train, x_test, y_test, steps: int = 2000, lr: float = 0.5) -> float:
    """Held-out accuracy of a logistic regression trained by plain gradient descent in numpy."""
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-9
    a, b = (x_train - mean) / scale, (x_test - mean) / scale
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    w = np.zeros(a.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-a @ w))
        w -= lr * a.T @ (p - y_train) / len(a)
    return float(((b @ w > 0) == (y_test == 1)).mean())


def test_inlp_leaves_a_fresh_probe_at_the_majority_rate():
    rng = np.random.default_rng(0)
    n, d = 4000, 12
    y = (rng.random(n) < 0.6).astype(float)
    mixing = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d)) @ mixing + np.outer(y, rng.normal(size=d) * 1.5)
    train, test = slice(0, n // 2), slice(n // 2, n)
    majority = max(y[test].mean(), 1 - y[test].mean())
    before = _probe_accuracy(x[train], y[train], x[test], y[test])
    directions = inlp_directions(torch.tensor(x[train]), torch.tensor(y[train]), 8).numpy()
    assert np.abs(directions @ directions.T - np.eye(8)).max() < 1e-6  # each probe sees the earlier ones removed
    projected = x - x @ directions.T @ directions
    after = _probe_accuracy(projected[train], y[train], projected[test], y[test])
    assert before > majority + 0.2
    assert after <= majority + 0.05


def test_leace_leaves_no_cross_covariance_with_the_label(tiny_models, tokenizer, shared_data):
    model = tiny_models["llama"]
    pairs = fitting_pairs(shared_data / "winobias" / "data", shared_data / "winogender" / "data")[::20]
    reps = extract(model, tokenizer, pairs)
    projection = fit("leace", reps, 1.0)(1.0)
    x, z = reps.tokens.double().numpy(), reps.labels.double().numpy()

    def cross_covariance(values: np.ndarray) -> np.ndarray:
        return (values - values.mean(0)).T @ (z - z.mean()) / (len(z) - 1)

    assert np.abs(cross_covariance(x)).max() > 1e-2
    assert np.abs(cross_covariance(x @ projection.numpy().T)).max() <= 1e-5


def test_stage_36_fits_once_scores_each_strength_and_saves_the_choice(tokenizer, shared_data, tmp_path):
    from conftest import load_script
    from fairforget.tiny import save_tiny_model

    stage = load_script("36_projection.py")
    base = save_tiny_model("llama", tokenizer, tmp_path / "base")
    cfg = stage.Config(method="sentence_debias", model=str(base), strengths=[1.0, 2.0],
                       winobias_dir=shared_data / "winobias" / "data", winogender_dir=shared_data / "winogender" / "data",
                       fit_limit=40, stereoset=shared_data / "stereoset" / "dev.json", selection_limit=8,
                       max_lms_drop=None, max_ppl_increase=None, out=tmp_path / "out", log_dir=tmp_path / "log",
                       device="cpu")
    cfg.validate()
    stage.main(cfg)
    record = read_json(tmp_path / "log" / "method.json")
    rows = record["selection"]
    assert [r["strength"] for r in rows] == [0.0, 1.0, 2.0]
    best = min(rows[1:], key=lambda r: abs(r["ss"] - 50))
    assert record["chosen_strength"] == best["strength"] and record["strength_name"] == "k"
    fitting = record["fitting_data"]
    assert sum(fitting["pairs"].values()) == 40 and fitting["pairs"]["winobias-dev"] > fitting["pairs"]["winogender"]
    assert fitting["sentences"] == 80 and 2 * fitting["male_rows"] == fitting["token_rows"]
    saved = load_model(str(tmp_path / "out"), "cpu").model
    assert saved.config.to_dict()[CONFIG_KEY] == {"method": "sentence_debias", "strength": best["strength"],
                                                  "untied_lm_head": True, "folded_into": "lm_head.weight = W P",
                                                  "strength_name": "k"}
    start = load_model(str(base), "cpu").model
    assert torch.equal(saved.get_input_embeddings().weight, start.get_input_embeddings().weight)
    assert not torch.equal(saved.lm_head.weight, start.lm_head.weight)
    with pytest.raises(stage.FairforgetError, match="alpha"):
        stage.Config(method="leace", strengths=[1.5]).validate()
