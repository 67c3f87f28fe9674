"""PCGU: partition counts, per-partition cosines, selection, and what exactly one step changes."""

import copy

import pytest
import torch

from fairforget.pcgu import (apply_update, encode_pairs, gradients, partition_cosines, partition_tensors, pcgu_step,
                             select_lowest, sequence_scores)
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
    from fairforget.pcgu import PartitionedTensor

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


def test_dynamic_direction_lowers_the_side_the_model_prefers(tiny_models, tokenizer):
    model = copy.deepcopy(tiny_models["llama"])
    tensors = partition_tensors(model)
    adv, dis = encode_pairs(tokenizer, PAIRS)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        fa = sequence_scores(model, collate(adv, pad)).tolist()
        fd = sequence_scores(model, collate(dis, pad)).tolist()
    result = pcgu_step(model, tensors, adv, dis, pad, k=10, lr=1e-3, direction="dynamic")
    assert result.lowered == ["adv" if a >= d else "dis" for a, d in zip(fa, fd)]
    assert result.f_adv == pytest.approx(fa, abs=1e-5) and result.f_dis == pytest.approx(fd, abs=1e-5)
