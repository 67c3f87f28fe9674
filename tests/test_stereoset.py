"""StereoSet metrics against hand computation, halves, malformed input, paired comparison, the stage script."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from fairforget.errors import FairforgetError
from fairforget.scoring import score_continuations
from fairforget.evals.stereoset import (compare_runs, compute_metrics, decisions, load_stereoset, score_examples,
                                  select_half, stratified_limit)

def _items(example_id, target, bias_type, stereo, anti, unrelated, split="intrasentence"):
    return [{"example_id": example_id, "split": split, "bias_type": bias_type, "target": target,
             "gold_label": label, "score": score}
            for label, score in (("stereotype", stereo), ("anti-stereotype", anti), ("unrelated", unrelated))]


# Target "nurse": 3 examples. e1 pro, both related; e2 anti, stereo related only; e3 tie (counts as anti),
# neither related. Target "imam": 1 example, pro, anti related only.
FIXTURE = (_items("e1", "nurse", "gender", -1.0, -2.0, -3.0)
           + _items("e2", "nurse", "gender", -2.0, -1.0, -1.5)
           + _items("e3", "nurse", "gender", -2.0, -2.0, -1.0)
           + _items("e4", "imam", "religion", -1.0, -3.0, -2.0))


def test_metrics_match_hand_computation():
    m = compute_metrics(FIXTURE, n_boot=50)
    # nurse: pro 1/3 -> SS 33.33; related (2 + 1 + 0) / 6 -> LMS 50. imam: SS 100, related 1/2 -> LMS 50.
    ss = (100 / 3 + 100) / 2
    lms = (50 + 50) / 2
    overall = m["intrasentence"]["all"]
    assert overall["ss"] == pytest.approx(ss)
    assert overall["lms"] == pytest.approx(lms)
    assert overall["icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)
    assert overall["ss_micro"] == pytest.approx(100 * 2 / 4)
    gender = m["intrasentence"]["gender"]
    assert gender["ss"] == pytest.approx(100 / 3) and gender["lms"] == pytest.approx(50)
    assert gender["icat"] == pytest.approx(50 * (100 / 3) / 50)
    assert m["intrasentence"]["religion"]["ss"] == pytest.approx(100)
    assert m["overall"]["all"]["ss"] == pytest.approx(ss)
    for name in ("ss", "lms", "icat", "ss_micro"):
        low, high = overall[f"{name}_ci"]
        assert low <= overall[name] + 1e-9 and overall[name] - 1e-9 <= high


def test_ties_count_as_anti():
    d = decisions(_items("t", "x", "race", -1.0, -1.0, -5.0))
    assert not d.pro[0]
    assert d.related[0] == 2


def test_targets_with_same_name_merge_across_splits_in_overall():
    items = _items("a", "t", "race", -1, -2, -3) + _items("b", "t", "race", -2, -1, -3, split="intersentence")
    m = compute_metrics(items, n_boot=20)
    assert m["overall"]["all"]["n_targets"] == 1
    assert m["overall"]["all"]["ss"] == pytest.approx(50)


def test_bootstrap_interval_narrows_with_more_items():
    rng = np.random.default_rng(0)
    items = []
    for i in range(400):
        s, a, u = rng.normal(size=3)
        items += _items(f"e{i}", f"t{i % 20}", "race", s, a, u)
    wide = compute_metrics(items[: 3 * 40], n_boot=200)["intrasentence"]["all"]["ss_ci"]
    narrow = compute_metrics(items, n_boot=200)["intrasentence"]["all"]["ss_ci"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_halves_are_disjoint_cover_all_and_are_stratified(shared_data):
    examples = load_stereoset(shared_data / "stereoset" / "dev.json")
    assert len(examples) == 2106 + 2123
    selection = select_half(examples, "selection", seed=3)
    heldout = select_half(list(reversed(examples)), "heldout", seed=3)
    ids_sel, ids_held = {e.id for e in selection}, {e.id for e in heldout}
    assert not ids_sel & ids_held
    assert len(ids_sel | ids_held) == len({e.id for e in examples})
    for split in ("intrasentence", "intersentence"):
        for domain in ("gender", "race"):
            n_sel = sum(e.split == split and e.bias_type == domain for e in selection)
            n_held = sum(e.split == split and e.bias_type == domain for e in heldout)
            assert abs(n_sel - n_held) <= 1
    limited = stratified_limit(examples, 100, seed=1)
    assert 95 <= len(limited) <= 105
    assert {e.split for e in limited} == {"intrasentence", "intersentence"}


def test_malformed_file_names_the_file(tmp_path):
    bad = tmp_path / "dev.json"
    bad.write_text('{"data": {"intrasentence": [')
    with pytest.raises(FairforgetError, match=str(bad)):
        load_stereoset(bad)
    bad.write_text(json.dumps({"data": {"intrasentence": [{"id": "x", "target": "t", "bias_type": "race",
                                                           "context": "BLANK", "sentences": []}],
                                        "intersentence": []}}))
    with pytest.raises(FairforgetError, match=r"intrasentence\[0\]"):
        load_stereoset(bad)
    with pytest.raises(FairforgetError, match="not found"):
        load_stereoset(tmp_path / "missing.json")


def test_compare_runs_is_paired():
    before = _items("a", "t", "race", -1, -2, -3) + _items("b", "t", "race", -1, -2, -3) + \
        _items("c", "t", "race", -2, -1, -3)
    after = _items("a", "t", "race", -2, -1, -3) + _items("b", "t", "race", -1, -2, -3) + \
        _items("c", "t", "race", -2, -1, -3) + _items("d", "t", "race", -1, -2, -3)
    result = compare_runs(before, after, n_boot=50)
    overall = result["overall"]
    assert result["n_common"] == 3
    assert overall["true_before_only"] == 1 and overall["true_after_only"] == 0
    assert overall["delta_ss_micro"] == pytest.approx(100 * (1 / 3 - 2 / 3))
    assert overall["mdc"] == pytest.approx(100 * 1.959964 * 1 / 3, rel=1e-6)  # one flip of 3: 1.96 sqrt(1) / 3
    with pytest.raises(FairforgetError):
        compare_runs(before, _items("z", "t", "race", -1, -2, -3))


def test_stage_script_writes_its_run_folder(tmp_path, shared_data, tokenizer):
    from fairforget.tiny import save_tiny_model

    model_dir = save_tiny_model("gpt2", tokenizer, tmp_path / "tiny-gpt2")
    stage = load_script("13_evaluate_stereoset.py")
    out = tmp_path / "run"
    stage.main(stage.Config(model=str(model_dir), data=shared_data / "stereoset" / "dev.json", limit=16,
                            n_boot=20, device="cpu", out=out))
    written = json.loads((out / "metrics.json").read_text())
    assert written["evaluation"] == "stereoset" and written["provenance"]["config"]["limit"] == 16
    metrics = written["metrics"]
    assert 0 <= metrics["intrasentence"]["gender"]["ss"] <= 100
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 3 * metrics["overall"]["all"]["n"]
    assert (out / "metrics.csv").is_file() and (out / "ss_by_domain_overall.png").is_file()
    stage.main(stage.Config(model=str(model_dir), data=shared_data / "stereoset" / "dev.json", limit=16,
                            n_boot=20, device="cpu", out=tmp_path / "again", compare_to=out))
    comparison = json.loads((tmp_path / "again" / "comparison.json").read_text())["comparison"]
    assert comparison["overall"]["true_before_only"] == 0 and comparison["overall"]["true_after_only"] == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mamba"])
def test_shared_context_scores_equal_each_candidate_scored_alone(arch, tiny_models, tokenizer, shared_data):
    examples = stratified_limit(load_stereoset(shared_data / "stereoset" / "dev.json"), 16, seed=2)
    assert {e.split for e in examples} == {"intrasentence", "intersentence"}
    # the reference: every candidate as its own full sequence (context + " " + sentence), one at a time
    expected = {}
    for ex in examples:
        for sentence_id, sentence in ex.sentences.values():
            prefix, cont = ("", sentence) if ex.split == "intrasentence" else (ex.context, " " + sentence)
            expected[sentence_id] = score_continuations(tiny_models[arch], tokenizer, [(prefix, cont)],
                                                        batch_size=1)[0]
    for batch_size in (1, 32):  # one context per batch (1 // 3 -> 1) and ten contexts of different lengths
        items = score_examples(tiny_models[arch], tokenizer, examples, batch_size=batch_size)
        assert len(items) == len(expected) == 3 * len(examples)
        for item in items:
            ref = expected[item["sentence_id"]]
            assert item["n_tokens"] == ref.n_tokens
            assert item["logprob_sum"] == pytest.approx(ref.logprob, abs=1e-4)
            assert item["score"] == pytest.approx(ref.mean, abs=1e-4)
