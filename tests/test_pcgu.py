"""PCGU: partition counts, per-partition cosines, selection, and what exactly one step changes."""

import copy

import pytest
import torch

from fairforget.errors import FairforgetError

from fairforget.methods.pcgu import (RetainTerm, apply_update, differing_span, encode_pairs, gradients, partition_cosines,
                             partition_tensors, pcgu_step, select_lowest, sequence_scores)
from fairforget.evals.perplexity import load_neutral_texts
from fairforget.methods.selection import choose
from fairforget.scoring import collate
from fairforget.winogender import Pair

SENTENCES = [
    ("The nurse said that she was tired.", "The nurse said that he was tired."),
    ("The engineer said that he fixed it.", "The engineer said that she fixed it."),
    ("The doctor told the patient that he would operate today.", "The doctor told the patient that she would operate today."),
    ("The secretary said that she would call back.", "The secretary said that he would call back."),
]
PAIRS = [Pair(f"p{i}", "x", "t", a, d, "male", 10.0, "test") for i, (a, d) in enumerate(SENTENCES)]


def _dims(model):
    """(out_dim, in_dim) of every unique >=2-D parameter and the number of 1-D ones, from module attributes."""
    from transformers.pytorch_utils import Conv1D

    dims, n_vectors, seen = [], 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() == 1:
                n_vectors += 1
            elif isinstance(module, Conv1D):
                dims.append((module.nf, module.nx))
            else:
                dims.append((p.shape[0], p.shape[1]))
    return dims, n_vectors


@pytest.mark.parametrize("arch", ["llama", "mamba", "gpt2"])
def test_partition_counts_follow_the_formula(tiny_models, arch):
    model = tiny_models[arch]
    dims, n_vectors = _dims(model)
    rows = sum(t.n_partitions for t in partition_tensors(model, "rows"))
    cols = sum(t.n_partitions for t in partition_tensors(model, "columns"))
    assert rows == sum(o for o, _ in dims) + n_vectors
    assert cols == sum(i for _, i in dims) + n_vectors


def test_mamba_130m_row_partitions_match_the_guide():
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2,
                         conv_kernel=4)
    with torch.device("meta"):
        model = MambaForCausalLM(config)
    assert sum(t.n_partitions for t in partition_tensors(model, "rows")) == 255_049


@pytest.mark.parametrize("shape,axis", [((5, 7), 0), ((5, 7), 1), ((6, 1, 4), 0), ((9,), None)])
def test_partition_cosines_equal_a_per_row_loop(shape, axis):
    gen = torch.Generator().manual_seed(0)
    a, d = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    if axis is not None:
        a.select(axis, 1).zero_()  # a partition without gradient
    n = 1 if axis is None else shape[axis]
    ours = partition_cosines(a, d, axis, n)
    for i in range(n):
        ra = a.flatten() if axis is None else a.select(axis, i).flatten()
        rd = d.flatten() if axis is None else d.select(axis, i).flatten()
        if ra.norm() == 0:
            assert ours[i] == float("inf")
        else:
            assert ours[i].item() == pytest.approx(torch.dot(ra, rd).item() / (ra.norm() * rd.norm()).item(), abs=1e-6)
    assert torch.all(partition_cosines(None, d, axis, n) == float("inf"))


def test_select_lowest_picks_the_global_k_smallest_and_never_undefined():
    cos = [torch.tensor([0.5, -0.2, float("inf")]), torch.tensor([0.1]), torch.tensor([-0.9, 0.3, float("inf")])]
    chosen = select_lowest(cos, 3)
    assert [c.tolist() for c in chosen] == [[1], [0], [0]]
    everything = select_lowest(cos, 100)
    assert sum(c.numel() for c in everything) == 5  # the two +inf partitions are never selected


def test_apply_update_changes_only_the_given_columns():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    from fairforget.methods.pcgu import PartitionedTensor

    t = PartitionedTensor("w", p, 1)
    apply_update(t, torch.ones(3, 4), torch.tensor([0, 2]), -0.5)
    expected = torch.zeros(3, 4)
    expected[:, [0, 2]] = -0.5
    assert torch.equal(p.detach(), expected)


def test_sequence_score_gradient_matches_hand_written_loss(tiny_models, tokenizer):
    model = copy.deepcopy(tiny_models["llama"])
    tensors = partition_tensors(model)
    adv, _ = encode_pairs(tokenizer, PAIRS)
    batch = collate(adv, tokenizer.pad_token_id)
    scores, grads = gradients(model, tensors, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["target_mask"][:, 1:].float()
    per_row = (logp * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(scores, per_row.detach(), rtol=1e-5, atol=1e-5)
    per_row.sum().backward()
    for t, g in zip(tensors, grads):
        torch.testing.assert_close(g, t.param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,aggregation,direction", [("llama", "rows", "advantaged"),
                                                        ("gpt2", "columns", "advantaged"),
                                                        ("llama", "rows", "disadvantaged")])
def test_one_step_changes_exactly_the_selected_partitions(tiny_models, tokenizer, arch, aggregation, direction):
    model = copy.deepcopy(tiny_models[arch])
    tensors = partition_tensors(model, aggregation)
    before = {t.name: t.param.detach().clone() for t in tensors}
    adv, dis = encode_pairs(tokenizer, PAIRS)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        fa0 = sequence_scores(model, collate(adv, pad)).sum()
        fd0 = sequence_scores(model, collate(dis, pad)).sum()
    result = pcgu_step(model, tensors, adv, dis, pad, k=25, lr=1e-3, direction=direction)
    assert sum(result.selected) == 25
    assert result.f_adv == pytest.approx(sequence_scores(copy.deepcopy(tiny_models[arch]), collate(adv, pad)).tolist(),
                                         abs=1e-5)
    changed = 0
    for t, n_sel in zip(tensors, result.selected):
        diff = (t.param.detach() != before[t.name])
        per_partition = diff.reshape(1, -1).any(1) if t.axis is None else diff.movedim(t.axis, 0).reshape(
            t.n_partitions, -1).any(1)
        assert int(per_partition.sum()) == n_sel
        changed += int(per_partition.sum())
    assert changed == 25
    with torch.no_grad():
        fa1 = sequence_scores(model, collate(adv, pad)).sum()
        fd1 = sequence_scores(model, collate(dis, pad)).sum()
    if direction == "advantaged":
        assert fa1 < fa0
    else:
        assert fd1 > fd0


def test_dynamic_lower_direction_lowers_the_side_the_model_prefers(tiny_models, tokenizer):
    model = copy.deepcopy(tiny_models["llama"])
    tensors = partition_tensors(model)
    adv, dis = encode_pairs(tokenizer, PAIRS)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        fa = sequence_scores(model, collate(adv, pad)).tolist()
        fd = sequence_scores(model, collate(dis, pad)).tolist()
    result = pcgu_step(model, tensors, adv, dis, pad, k=10, lr=1e-3, direction="dynamic_lower")
    assert result.lowered == ["adv" if a >= d else "dis" for a, d in zip(fa, fd)]
    assert result.f_adv == pytest.approx(fa, abs=1e-5) and result.f_dis == pytest.approx(fd, abs=1e-5)


def _token_logprobs(model, ids):
    """log p(token t | tokens < t) for t >= 1 of one sequence, full logits (independent of fairforget.scoring)."""
    ids = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logp.gather(1, ids[0, 1:, None]).squeeze(1)


def test_differing_span_targets_on_hand_made_pairs(tokenizer):
    assert differing_span([1, 5, 6, 7, 8], [1, 5, 9, 7, 8]) == (2, 2)
    assert differing_span([1, 5, 6, 6, 8], [1, 5, 6, 8]) == (3, 1)  # the suffix never overlaps the prefix
    pair = Pair("p", "nurse", "t", "She is a nurse.", "He is a nurse.", "female", 90.0, "test")
    words = lambda e: tokenizer.convert_ids_to_tokens(e.ids[e.n_prefix:])  # noqa: E731
    (a,), (d,) = encode_pairs(tokenizer, [pair], "differing")
    assert words(a) == ["She"] and words(d) == ["He"] and len(a.ids) == 2  # cut after the span
    (a,), (d,) = encode_pairs(tokenizer, [pair], "after")
    assert words(a) == words(d) == ["Ġis", "Ġa", "Ġnurse", "."]
    (a,), _ = encode_pairs(tokenizer, [pair], "differing_after")
    assert words(a) == ["She", "Ġis", "Ġa", "Ġnurse", "."]
    (a,), _ = encode_pairs(tokenizer, [pair], "all")
    assert a.n_prefix == 1 and words(a) == ["She", "Ġis", "Ġa", "Ġnurse", "."]
    (a,), (d,) = encode_pairs(tokenizer, PAIRS[:1], "differing")
    assert words(a) == ["Ġshe"] and words(d) == ["Ġhe"]
    end = Pair("q", "x", "t", "I saw him", "I saw her", "male", 10.0, "test")
    with pytest.raises(FairforgetError, match="nothing follows"):
        encode_pairs(tokenizer, [end], "after")


@pytest.mark.parametrize("targets", ["differing", "after"])
def test_signed_gradient_of_target_tokens_matches_autograd(tiny_models, tokenizer, targets):
    model = copy.deepcopy(tiny_models["llama"])
    tensors = partition_tensors(model)
    adv, _ = encode_pairs(tokenizer, PAIRS, targets)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    scores, grads = gradients(model, tensors, collate(adv, tokenizer.pad_token_id), signs)
    total, expected = 0.0, []
    for e, sign in zip(adv, signs):
        logp = _token_logprobs(model, list(e.ids))[e.n_prefix - 1:]  # the scored tokens only
        expected.append(logp.mean())
        total = total + sign * logp.mean()
    torch.testing.assert_close(scores, torch.stack(expected).detach(), rtol=1e-5, atol=1e-5)
    total.backward()
    for t, g in zip(tensors, grads):  # batched (padded) vs one at a time: float noise only
        torch.testing.assert_close(g, t.param.grad, rtol=1e-3, atol=1e-3 * float(t.param.grad.abs().max()))


def test_dynamic_direction_moves_selected_partitions_by_lr_times_signed_difference(tiny_models, tokenizer):
    model = copy.deepcopy(tiny_models["llama"])
    start = copy.deepcopy(model)
    tensors = partition_tensors(model)
    adv, dis = encode_pairs(tokenizer, PAIRS, "differing")
    pad, lr = tokenizer.pad_token_id, 1e-2
    # independently: m_i = +1 where the model prefers x_a, and the gradients of sum m_i f per side
    fa = [_token_logprobs(start, list(e.ids))[e.n_prefix - 1:].mean() for e in adv]
    fd = [_token_logprobs(start, list(e.ids))[e.n_prefix - 1:].mean() for e in dis]
    m = [1.0 if a >= d else -1.0 for a, d in zip(fa, fd)]
    params = [p for p in start.parameters()]
    g_a = torch.autograd.grad(sum(mi * a for mi, a in zip(m, fa)), params, allow_unused=True, retain_graph=True)
    g_d = torch.autograd.grad(sum(mi * d for mi, d in zip(m, fd)), params, allow_unused=True)
    result = pcgu_step(model, tensors, adv, dis, pad, k=40, lr=lr, direction="dynamic")
    assert result.lowered == ["adv" if mi > 0 else "dis" for mi in m]
    by_name = dict(zip([n for n, _ in start.named_parameters()], zip(params, g_a, g_d)))
    for t in tensors:
        name = next(n for n, p in model.named_parameters() if p is t.param)
        before, ga, gd = by_name[name]
        delta = t.param.detach() - before.detach()
        if ga is None or gd is None:
            assert torch.all(delta == 0)
            continue
        expected = lr * (gd - ga)
        changed = delta.reshape(1, -1).any(1) if t.axis is None else (delta != 0).movedim(t.axis, 0).reshape(
            t.n_partitions, -1).any(1)
        mask = changed if t.axis is None else changed.reshape([-1] + [1] * (delta.dim() - 1)).movedim(0, t.axis)
        torch.testing.assert_close(delta, expected * mask, rtol=1e-3, atol=1e-8)
    assert sum(result.selected) == 40


def test_min_cos_keeps_only_partitions_below_it():
    cos = [torch.tensor([0.5, -0.2, float("inf")]), torch.tensor([0.1, -0.6])]
    chosen = select_lowest(cos, 10, min_cos=0.0)
    assert [c.tolist() for c in chosen] == [[1], [1]]


def test_lms_budget_keeps_the_start_unless_a_point_is_closer_to_50_within_it():
    start = {"step": 0, "lms": 80.0, "distance_from_50": 14.8}
    damaged = {"step": 6, "lms": 41.3, "distance_from_50": 0.1}  # SS 50 by wrecking the language model
    mild = {"step": 3, "lms": 78.5, "distance_from_50": 9.0}
    assert choose([damaged], "step", None, {"lms": 80.0}) is damaged  # no budget: trained points only, closest wins
    assert choose([start, damaged], "step", 2.0, {"lms": 80.0}) is start
    assert choose([start, mild], "step", 2.0, {"lms": 80.0}) is mild and choose([start, mild], "step", 1.0, {"lms": 80.0}) is start
    farther = {**mild, "distance_from_50": 15.0}  # within budget but farther from 50
    assert choose([start, farther], "step", 2.0, {"lms": 80.0}) is start
    assert choose([mild, {**mild, "step": 9}], "step", None, {"lms": 80.0})["step"] == 3  # a tie keeps the earlier point


def test_retain_kl_is_zero_at_the_start_and_positive_after_a_change(tiny_models, tokenizer):
    model = copy.deepcopy(tiny_models["llama"])
    tensors = partition_tensors(model)
    texts = load_neutral_texts("retain", limit=3)
    retain = RetainTerm("kl", model, tokenizer, texts, batch_size=3)
    grads = retain.gradients(model, tensors)
    assert abs(retain.last_value) < 1e-6
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-6
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.05 * torch.randn_like(model.get_output_embeddings().weight))
    retain.gradients(model, tensors)
    assert retain.last_value > 1e-4
    lm = RetainTerm("lm", model, tokenizer, texts, batch_size=3)
    value = lm.loss(model, lm.next_batch())
    expected = sum(-_token_logprobs(model, list(e.ids)).mean() for e in lm.encoded)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)


def test_every_ablation_config_loads_into_the_stage_config():
    from pathlib import Path

    from conftest import REPO, load_script
    from fairforget.config import _load_overrides

    stage = load_script("12_pcgu_unlearn.py")
    files = sorted((REPO / "configs" / "pcgu").glob("*.json"))
    assert files
    for path in files:
        overrides = _load_overrides(path, stage.Config())
        assert overrides["heldout_eval"] and overrides["selection_metric"] == "gender"
        assert Path(overrides["pairs"]).name.startswith("pairs")


def test_stage_12_keeps_the_closest_point_within_the_perplexity_budget(tmp_path, tokenizer, shared_data):
    """The same training run twice: with a loose perplexity bound the point closest to SS 50 is kept (here a
    trained one, more perplexed than the start); with --max-ppl-increase 0 only points no more perplexed than the
    start (the start included) may be, so the start is kept."""
    from conftest import load_script
    from fairforget.artifacts import read_json
    from fairforget.config import parse_config
    from fairforget.tiny import save_tiny_model
    from fairforget.winogender import load_winogender_pairs, write_pairs_tsv

    wino = shared_data / "winogender" / "data"
    pairs = load_winogender_pairs(wino / "all_sentences.tsv", wino / "occupations-stats.tsv", "bergsma")
    write_pairs_tsv(tmp_path / "pairs.tsv", pairs[:24])
    model = save_tiny_model("llama", tokenizer, tmp_path / "tiny", seed=0)
    stage = load_script("12_pcgu_unlearn.py")
    runs = {}
    for name, bound in (("loose", "1e6"), ("tight", "0")):
        stage.main(parse_config(stage.Config(), [
            "--model", str(model), "--pairs", str(tmp_path / "pairs.tsv"), "--stereoset",
            str(shared_data / "stereoset" / "dev.json"), "--epochs", "2", "--batch-size", "4", "--k", "500",
            "--lr", "1e-2", "--evals-per-epoch", "2", "--selection-limit", "40", "--selection-ppl-texts", "8",
            "--n-boot", "10", "--max-lms-drop", "none", "--max-ppl-increase", bound, "--device", "cpu",
            "--out", str(tmp_path / name / "model"), "--log-dir", str(tmp_path / name / "log")]))
        runs[name] = read_json(tmp_path / name / "log" / "summary.json")
    points = runs["loose"]["epochs"]
    assert [(e["step"], e["perplexity"]) for e in points] == [(e["step"], e["perplexity"])
                                                              for e in runs["tight"]["epochs"]]
    closest = lambda rows: min(rows, key=lambda e: (e["distance_from_50"], e["step"]))["step"]  # noqa: E731
    in_budget = [e for e in points if e["perplexity"] <= points[0]["perplexity"]]
    assert runs["loose"]["kept_step"] == closest(points)
    assert runs["tight"]["kept_step"] == closest(in_budget)
    kept = next(e for e in points if e["step"] == runs["loose"]["kept_step"])
    assert kept["step"] and kept["perplexity"] > points[0]["perplexity"]  # out of the tight budget
    assert runs["tight"]["kept_step"] == 0  # the bound decided the choice
    assert "perplexity at most 0.0% above the start's on 8 retain-half" in runs["tight"]["criterion"]
