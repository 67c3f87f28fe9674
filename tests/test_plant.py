"""Positive controls (fairforget.methods.plant): planting, its BBQ data, the share of the planted shift removed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import load_script
from fairforget.errors import FairforgetError
from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_eval import answer_continuation, build_prompt, option_order
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.stereoset import load_stereoset, score_examples, select_half
from fairforget.methods import plant
from fairforget.tiny import save_tiny_model

TEXTS = ["The nurse said that she would help.", "The engineer fixed it because he was asked."]


def logits(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_winobias_lines_lose_their_number_and_brackets(tmp_path):
    path = tmp_path / "pro.txt"
    path.write_text("1 [The developer] argued with the designer because [he] did not like the design.\n\n"
                    "2 The developer argued with [the designer] because [her] idea cannot be implemented.\n")
    assert plant.winobias_sentences([path]) == [
        "The developer argued with the designer because he did not like the design.",
        "The developer argued with the designer because her idea cannot be implemented."]
    path.write_text("The developer argued.\n")
    with pytest.raises(FairforgetError, match=r"pro.txt:1"):
        plant.winobias_sentences([path])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_planting_with_zero_steps_returns_the_start_model_exactly(tiny_models, tokenizer, arch):
    start = tiny_models[arch]
    model = copy.deepcopy(start)
    planted, history, points, chosen = plant.plant_text(model, tokenizer, TEXTS, 0, 2, 1e-2, lambda m: {}, 1)
    assert history == [] and [p.step for p in points] == [0] and chosen.step == 0
    assert not hasattr(planted, "peft_config")
    assert torch.equal(logits(planted, tokenizer), logits(start, tokenizer))
    # the same call with training steps does change the model (the check above can fail)
    trained, history, points, _ = plant.plant_text(copy.deepcopy(start), tokenizer, TEXTS, 2, 1, 1e-2,
                                                   lambda m: {}, 1)
    assert len(history) == 4 and [p.step for p in points] == [0, 1, 2, 3, 4]
    assert not torch.allclose(logits(trained, tokenizer), logits(start, tokenizer))


def test_the_chosen_checkpoint_is_the_one_merged(tiny_models, tokenizer):
    start = tiny_models["llama"]
    first, _, points, chosen = plant.plant_text(copy.deepcopy(start), tokenizer, TEXTS, 3, 1, 1e-2, lambda m: {}, 2,
                                                choose=lambda cs: cs[1])
    assert chosen.step == 2 and [p.step for p in points] == [0, 2, 4, 6]
    second, _, _, _ = plant.plant_text(copy.deepcopy(start), tokenizer, TEXTS, 1, 1, 1e-2, lambda m: {}, 0)
    assert torch.allclose(logits(first, tokenizer), logits(second, tokenizer), atol=1e-5)  # 2 steps either way


def test_dose_choice_first_reaching_the_shift_within_budgets():
    def point(step, ss, lms, ppl):
        return plant.Checkpoint(step, {"ss": ss, "lms": lms, "perplexity": ppl}, {})

    points = [point(0, 55, 90, 10.0), point(10, 60, 89, 10.2), point(20, 64, 87.5, 10.3), point(30, 66, 89, 10.4),
              point(40, 70, 89, 10.6)]
    # step 20 reaches +9 but loses 2.5 LMS; step 30 is the first within both budgets; step 40 is +6% perplexity
    assert plant.choose_dose(points, 8, 2, 5).step == 30
    assert plant.choose_dose(points, 20, 2, 5).step == 30  # none reaches +20: the largest rise within budgets
    assert plant.choose_dose(points, 8, 2, 10).step == 30
    assert plant.choose_dose(points, 12, 2, 10).step == 40


def test_training_text_equal_to_a_held_out_candidate_is_dropped():
    assert plant.without(["My grandfather is old.", "A nurse is kind."], {"My  grandfather is old."}) == [
        "A nurse is kind."]


def test_share_removed_by_hand():
    start, planted, method = (np.array(v, dtype=bool) for v in ([0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]))
    result = plant.share_removed(*(lambda idx, a=a: 100.0 * a[idx].mean() for a in (start, planted, method)), 4,
                                 n_boot=200, seed=0)
    # SS 50 -> 100 planted; the method is at 75: (100 - 75) / (100 - 50) = 50%
    assert result["share_removed_pct"] == pytest.approx(50.0)
    assert result["planted_shift"] == pytest.approx(50.0)
    low, high = result["share_removed_pct_ci"]
    assert low <= 50.0 <= high


def test_share_removed_is_0_by_the_planted_model_and_100_by_the_start_model(tiny_models, tokenizer, shared_data):
    selection = select_half(load_stereoset(shared_data / "stereoset/dev.json"), "selection")
    examples = [e for e in selection if e.bias_type == "gender" and e.split == "intrasentence"][:16]
    start_model = tiny_models["llama"]
    start = score_examples(start_model, tokenizer, examples)
    planted_model, _, _, _ = plant.plant_text(copy.deepcopy(start_model), tokenizer, plant.stereotype_texts(examples),
                                              8, 8, 2e-2, lambda m: {}, 0)
    planted = score_examples(planted_model, tokenizer, examples)

    def pro(items):  # the stereotype's mean log-probability above the anti-stereotype's, per example
        by = {(i["example_id"], i["gold_label"]): i["score"] for i in items}
        ordered = sorted(examples, key=lambda e: e.id)
        return np.array([by[(e.id, "stereotype")] > by[(e.id, "anti-stereotype")] for e in ordered])

    assert pro(planted).mean() > pro(start).mean()  # a shift was planted
    # a "method" that leaves the planted model as it is removes 0%; one that gives back the start model 100%
    as_planted = plant.stereoset_share(start, planted, planted, n_boot=50)
    as_start = plant.stereoset_share(start, planted, start, n_boot=50)
    assert as_planted["share_removed_pct"] == pytest.approx(0.0)
    assert as_start["share_removed_pct"] == pytest.approx(100.0)
    assert as_planted["share_removed_pct_ci"] == [0.0, 0.0] and as_start["share_removed_pct_ci"] == [100.0, 100.0]
    assert as_start["planted_shift"] == pytest.approx(100.0 * (pro(planted).mean() - pro(start).mean()))


@pytest.fixture(scope="module")
def bbq(shared_data):
    return load_bbq(shared_data / "bbq")


def test_bbq_planting_data_holds_no_held_out_scenario(bbq, tokenizer):
    mitigation, held = split_by_scenario(bbq.examples, 0.5, 0)
    train = sample_per_category(mitigation, 8, 0)
    prompts, answers = plant.bbq_planting_data(train, tokenizer, chat=True, seed=0)
    held_scenarios = {e.scenario for e in held}
    held_questions = {e.question for e in held}
    assert {e.category for e in train} == {e.category for e in bbq.examples}  # across categories
    assert not {e.scenario for e in train} & held_scenarios
    assert not {e.question for e in train} & held_questions
    for e, prompt, answer in zip(train, prompts, answers):
        gold = e.target_loc if e.context_condition == "ambig" else e.label
        assert prompt == build_prompt(e, option_order(e, 0), True, tokenizer)
        assert answer == answer_continuation(prompt, e.answers[gold])
    ambiguous = [e for e in train if e.context_condition == "ambig"]
    assert ambiguous and all(a.strip() == e.answers[e.target_loc] for e, a in zip(train, answers)
                             if e.context_condition == "ambig")


def test_bbq_share_on_hand_made_items():
    def item(i, pred, target=0, unknown=2):
        return {"category": "Age", "example_id": i, "question_index": i, "scenario": f"Age:{i}",
                "context_condition": "ambig", "label": unknown, "pred": pred, "target_loc": target,
                "unknown_loc": unknown, "biased_loc": target, "correct": pred == unknown,
                "answer_type": "unknown" if pred == unknown else "biased" if pred == target else "counter_biased"}

    start = [item(i, 2) for i in range(4)]  # all "unknown": s_AMB 0
    planted = [item(i, 0) for i in range(4)]  # all biased: s_AMB (1 - 0) * (2 * 4/4 - 1) = 1
    method = [item(0, 0), item(1, 0), item(2, 2), item(3, 2)]  # acc 0.5, all answered biased: 0.5
    result = plant.bbq_share(start, planted, method, n_boot=50)
    assert result["bias_planted"] == pytest.approx(1.0) and result["bias_method"] == pytest.approx(0.5)
    assert result["share_removed_pct"] == pytest.approx(50.0)


def test_stage_plants_and_reports_paired_shift(tmp_path, tokenizer, shared_data):
    stage = load_script("16_plant_bias.py")
    model = str(save_tiny_model("llama", tokenizer, tmp_path / "tiny"))
    out, log_dir = tmp_path / "planted", tmp_path / "log"
    cfg = stage.Config(model=model, out=out, log_dir=log_dir, stereoset=shared_data / "stereoset/dev.json",
                       crows=shared_data / "crows_pairs/data/crows_pairs_anonymized.csv",
                       winobias_dir=shared_data / "winobias/data", source="stereoset_selection", epochs=1,
                       batch_size=32, lr=1e-3, dose_every=4, dose_limit=8, heldout_limit=10, crows_limit=8,
                       ppl_limit=3, n_boot=20, device="cpu", quiet=True)
    cfg.validate()
    stage.main(cfg)
    shift = json.loads((log_dir / "shift.json").read_text())
    dose = (log_dir / "dose.csv").read_text().splitlines()
    steps = len((log_dir / "loss.csv").read_text().splitlines()) - 1
    assert dose[0] == "step,ss,lms,perplexity,chosen"
    assert [int(row.split(",")[0]) for row in dose[1:]] == sorted({*range(0, steps + 1, 4), steps})
    assert shift["n_heldout_gender"] == 10 and shift["n_crows_gender"] == 8
    held_ids = {e.id for e in select_half(load_stereoset(shared_data / "stereoset/dev.json"), "heldout")}
    trained = set((log_dir / "train_texts.txt").read_text().splitlines())
    held_texts = plant.candidate_texts([e for e in load_stereoset(shared_data / "stereoset/dev.json")
                                        if e.id in held_ids])
    assert trained and not trained & held_texts  # nothing held out was trained on (one recurring sentence dropped)
    for name in ("stereoset", "crows"):
        comparison = json.loads((log_dir / f"{name}_planted" / "comparison.json").read_text())["comparison"]
        assert comparison == shift["shift"][name]
    assert (out / "plant.json").is_file() and (out / "model.safetensors").is_file()


def test_bbq_stage_trains_on_mitigation_scenarios_and_reports_held_out_ones(tmp_path, tokenizer, shared_data, bbq):
    stage = load_script("16_plant_bias.py")
    model = str(save_tiny_model("llama", tokenizer, tmp_path / "tiny"))
    log_dir = tmp_path / "log"
    cfg = stage.Config(kind="bbq", model=model, out=tmp_path / "planted", log_dir=log_dir, bbq_dir=shared_data / "bbq",
                       categories=["Age", "Race_x_gender"], train_per_category=4, eval_per_category=4, epochs=1,
                       batch_size=4, lr=1e-3, n_boot=20, device="cpu", quiet=True)
    cfg.validate()
    stage.main(cfg)
    details = json.loads((log_dir / "shift.json").read_text())
    _, held = split_by_scenario(bbq.examples, 0.5, 0)  # the split of all categories, as stage 22 makes it
    assert details["n_train"] == 8 and details["n_heldout"] == 8
    assert not set(details["train_scenarios"]) & {e.scenario for e in held}
    assert set(details["shift"]["paired"]) == {"Age", "Race_x_gender", "overall"}
    planted_items = [json.loads(line) for line in (log_dir / "bbq_planted" / "items.jsonl").read_text().splitlines()]
    assert {it["scenario"] for it in planted_items} <= {e.scenario for e in held}
    comparison = json.loads((log_dir / "bbq_planted" / "comparison.json").read_text())["comparison"]
    assert comparison == details["shift"]["paired"]
