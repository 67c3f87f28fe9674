"""Scenario split and recovery fine-tuning (letter and answer-text losses, LoRA and full modes, pruning kept
intact: value and output projections untouched), and chosen-minus-random statistics."""

import copy
import json

import pytest
import torch

from fairforget.evals.bbq import load_bbq
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.choice_scoring import letter_token_ids
from fairforget.errors import FairforgetError
from fairforget.heads import batch_prompts, scale_heads
from fairforget.methods.recovery import (answer_loss, encode_answers, finetune_answer_texts, finetune_answers, frozen_parameters,
                                 merged, prepare_model, recovery_targets, text_loss)
from fairforget.scoring import collate

PROMPTS = ["Context: Ann cooked. Question: Who cooked?\nA. Ann\nB. Bob\nC. Unknown\nAnswer:",
           "Context: Bob ran. Question: Who ran?\nA. Ann\nB. Bob\nC. Unknown\nAnswer:",
           "Context: Nobody knows. Question: Who sang?\nA. Ann\nB. Bob\nC. Unknown\nAnswer:",
           "Context: Ann sang. Question: Who sang?\nA. Bob\nB. Ann\nC. Unknown\nAnswer:"]
GOLD = [0, 1, 2, 1]


def examples():
    rows = []
    for category, n_templates in (("Age", 7), ("Religion", 2), ("SES", 1)):
        for q in range(1, n_templates + 1):
            for i in range(4):
                rows.append({"category": category, "question_index": str(q), "example_id": len(rows), "i": i,
                             "question": f"{category} question {q}{'?' if i % 2 else '!'}"})
    return rows


def test_scenario_split_is_disjoint_seeded_and_complete():
    data = examples()
    data[0] = dict(data[0], question="Religion question 1!")  # links Age 1 with Religion 1 into one scenario
    mit, held = split_by_scenario(data, 0.5, seed=3)
    key = lambda e: (e["category"], int(e["question_index"]))  # noqa: E731
    assert not ({key(e) for e in mit} & {key(e) for e in held})
    assert ((("Age", 1) in {key(e) for e in mit}) == (("Religion", 1) in {key(e) for e in mit}))
    assert {id(e) for e in mit} | {id(e) for e in held} == {id(e) for e in data} and len(mit) + len(held) == len(data)
    assert any(e["category"] == "Age" for e in mit) and any(e["category"] == "Age" for e in held)
    again, _ = split_by_scenario(data, 0.5, seed=3)
    other, _ = split_by_scenario(data, 0.5, seed=4)
    assert again == mit and other != mit
    with pytest.raises(FairforgetError, match="mitigation-fraction"):
        split_by_scenario(data, 1.0)
    with pytest.raises(FairforgetError, match="question_index"):
        split_by_scenario([{"category": "Age", "example_id": 5}])


def test_scenario_split_of_released_data_shares_no_question(shared_data):
    data = load_bbq(shared_data / "bbq").examples
    for seed in (0, 1):
        mit, held = split_by_scenario(data, 0.5, seed=seed)
        assert not {e.question for e in mit} & {e.question for e in held}
        assert not {e.scenario for e in mit} & {e.scenario for e in held}
        for category in {e.category for e in data}:
            assert any(e.category == category for e in mit) and any(e.category == category for e in held)
    # the label and proper-name versions of the board-meeting scenario are one scenario
    scenario = {(e.category, e.question_index): e.scenario for e in data}
    assert scenario[("Gender_identity", 1)] == scenario[("Gender_identity", 26)]


def test_answer_loss_is_gold_letter_nll(tiny_models, tokenizer):
    model = tiny_models["llama"]
    variants = letter_token_ids(tokenizer, "ABC")
    with torch.no_grad():
        loss = answer_loss(model, batch_prompts(tokenizer, PROMPTS, "cpu"), torch.tensor(GOLD), variants)
        expected = []
        for prompt, g in zip(PROMPTS, GOLD):
            logprobs = torch.log_softmax(model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1], -1)
            expected.append(-torch.logsumexp(logprobs[variants[g]], 0))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)


ANSWERS = [" Ann", " Bob", " Unknown", " Ann"]


def _assert_heads_not_rescaled(final, pruned):
    params = dict(final.named_parameters())
    assert set(params) == set(pruned)  # merged back to a plain model
    for name, value in pruned.items():
        if "o_proj" in name or "v_proj" in name:  # the only modules that can rescale a head
            assert torch.equal(params[name], value), name
    assert torch.equal(params["model.layers.0.self_attn.o_proj.weight"][:, 16:32], torch.zeros(64, 16))
    assert not torch.equal(params["model.layers.0.self_attn.q_proj.weight"], pruned["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(params["model.layers.1.mlp.down_proj.weight"], pruned["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recovery_lowers_loss_and_keeps_pruned_slices(tiny_models, tokenizer, mode):
    model = copy.deepcopy(tiny_models["llama"])
    strengths = torch.zeros(2, 4)
    strengths[0, 1] = 1.0
    scale_heads(model, strengths)
    pruned = {n: p.clone() for n, p in model.named_parameters()}
    variants = letter_token_ids(tokenizer, "ABC")
    batch = batch_prompts(tokenizer, PROMPTS, "cpu")
    with torch.no_grad():
        before = answer_loss(model, batch, torch.tensor(GOLD), variants).item()
    trained = prepare_model(model, mode, seed=0)
    history = finetune_answers(trained, tokenizer, PROMPTS, GOLD, epochs=4, batch_size=2, lr=3e-3, seed=0)
    final = merged(trained)
    assert len(history) == 8
    with torch.no_grad():
        after = answer_loss(final, batch, torch.tensor(GOLD), variants).item()
    assert after < before
    _assert_heads_not_rescaled(final, pruned)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_answer_text_recovery_lowers_its_loss_and_keeps_pruned_slices(tiny_models, tokenizer, mode):
    model = copy.deepcopy(tiny_models["llama"])
    strengths = torch.zeros(2, 4)
    strengths[0, 1] = 1.0
    scale_heads(model, strengths)
    pruned = {n: p.clone() for n, p in model.named_parameters()}
    batch = collate(encode_answers(tokenizer, PROMPTS, ANSWERS), tokenizer.pad_token_id)
    with torch.no_grad():
        before = text_loss(model, batch).item()
    trained = prepare_model(model, mode, seed=0)
    history = finetune_answer_texts(trained, tokenizer, PROMPTS, ANSWERS, epochs=4, batch_size=2, lr=3e-3, seed=0)
    final = merged(trained)
    assert len(history) == 8
    with torch.no_grad():
        assert text_loss(final, batch).item() < before
    _assert_heads_not_rescaled(final, pruned)


def test_text_loss_is_the_mean_answer_token_nll(tiny_models, tokenizer):
    model = tiny_models["llama"]
    batch = collate(encode_answers(tokenizer, PROMPTS, ANSWERS), tokenizer.pad_token_id)
    expected = []
    with torch.no_grad():
        for prompt, answer in zip(PROMPTS, ANSWERS):
            p_ids, a_ids = tokenizer(prompt)["input_ids"], tokenizer(answer, add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([p_ids + a_ids])).logits[0], -1)
            expected.append(-torch.stack([logprobs[len(p_ids) - 1 + j, t] for j, t in enumerate(a_ids)]).mean())
        assert text_loss(model, batch).item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)


def test_recovery_targets_cannot_rescale_heads(tiny_models):
    assert set(recovery_targets(tiny_models["llama"])) == {"q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"}
    assert recovery_targets(tiny_models["gpt2"]) == ["c_fc", "mlp.c_proj"]
    for targets in (["q_proj", "o_proj"], ["v_proj"]):
        with pytest.raises(FairforgetError, match="undo the head"):
            prepare_model(copy.deepcopy(tiny_models["llama"]), "lora", targets=targets)
    with pytest.raises(FairforgetError, match="undo the head"):  # c_proj would also hit attn.c_proj
        recovery_targets(tiny_models["gpt2"], ["c_proj"])
    frozen = frozen_parameters(tiny_models["gpt2"])
    assert frozen and all(".attn.c_attn." in n or ".attn.c_proj." in n for n in frozen)
    lora = prepare_model(copy.deepcopy(tiny_models["gpt2"]), "lora", seed=0)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert adapted and not any(".attn." in n for n in adapted)


def test_difference_from_random_by_hand():
    import numpy as np

    from fairforget.methods.head_controls import difference_from_random

    ones, zeros = np.ones(40, bool), np.zeros(40, bool)
    share = lambda flags: lambda idx: 100.0 * flags[idx].mean()  # noqa: E731
    same = difference_from_random(share(ones), [share(ones)] * 3, 40, n_boot=99)
    assert same["delta"] == 0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0
    apart = difference_from_random(share(ones), [share(zeros), share(zeros)], 40, n_boot=99)
    assert apart["delta"] == 100 and apart["ci"] == [100.0, 100.0] and apart["p"] == pytest.approx(2 / 100)
    mixed = np.arange(40) % 2 == 0  # random draws at 50 and 0: chosen (100) - mean is 75 on the full sample
    result = difference_from_random(share(ones), [share(mixed), share(zeros)], 40, n_boot=400, seed=1)
    # resampling items alone keeps 100 - share(mixed)/2 above ~65; resampling the draws too gives replicates
    # with both draws "mixed" (100 - share(mixed), about 35..65) a quarter of the time
    assert result["delta"] == 75 and 25 < result["ci"][0] < 60 and result["ci"][1] == 100


def test_recovery_rejects_bad_inputs(tiny_models, tokenizer):
    with pytest.raises(FairforgetError, match="one gold answer"):
        finetune_answers(tiny_models["llama"], tokenizer, PROMPTS, GOLD[:2])
    with pytest.raises(FairforgetError, match="indices"):
        finetune_answers(tiny_models["llama"], tokenizer, PROMPTS, [0, 1, 2, 3])
