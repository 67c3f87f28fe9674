"""WinoGender / WinoBias pairs: the advantaged side follows the occupation statistic; files are validated."""

import csv
import json

import pytest

from conftest import load_script
from fairforget.config import run_script
from fairforget.errors import FairforgetError
from fairforget.evals.stereoset import load_stereoset, select_half
from fairforget.methods.selection import selection_examples
from fairforget.winogender import (load_occupation_stats, load_winobias_pairs, load_winogender_pairs, read_pairs_tsv,
                                   write_pairs_tsv)


@pytest.mark.parametrize("stat", ["bergsma", "bls"])
def test_advantaged_side_follows_the_statistic(shared_data, stat):
    folder = shared_data / "winogender" / "data"
    with open(folder / "occupations-stats.tsv", newline="") as handle:
        pct = {r["occupation"]: float(r[f"{stat}_pct_female"]) for r in csv.DictReader(handle, delimiter="\t")}
    with open(folder / "all_sentences.tsv", newline="") as handle:
        sentence = {r["sentid"]: r["sentence"] for r in csv.DictReader(handle, delimiter="\t")}
    pairs = load_winogender_pairs(folder / "all_sentences.tsv", folder / "occupations-stats.tsv", stat)
    assert len(pairs) == 240
    for pair in pairs:
        adv = "male" if pct[pair.occupation] < 50 else "female"
        dis = "female" if adv == "male" else "male"
        assert pair.adv_gender == adv
        assert pair.advantaged == sentence[f"{pair.template}.{adv}.txt"]
        assert pair.disadvantaged == sentence[f"{pair.template}.{dis}.txt"]
    if stat == "bergsma":
        assert sum(p.adv_gender == "male" for p in pairs) == 4 * 49  # 49 of 60 occupations below 50%


def test_winobias_pro_sentence_is_advantaged(shared_data):
    pairs = load_winobias_pairs(shared_data / "winobias" / "data", "dev")
    assert len(pairs) == 2 * 396
    first = pairs[0]
    assert first.advantaged == "The developer argued with the designer because he did not like the design."
    assert first.disadvantaged == "The developer argued with the designer because she did not like the design."
    assert first.occupation == "developer" and first.adv_gender == "male"
    assert all("[" not in p.advantaged and "[" not in p.disadvantaged for p in pairs)


def test_pairs_tsv_round_trip(shared_data, tmp_path):
    folder = shared_data / "winogender" / "data"
    pairs = load_winogender_pairs(folder / "all_sentences.tsv", folder / "occupations-stats.tsv")[:5]
    write_pairs_tsv(tmp_path / "pairs.tsv", pairs)
    assert read_pairs_tsv(tmp_path / "pairs.tsv") == pairs


def test_malformed_inputs_name_file_and_line(tmp_path):
    stats = tmp_path / "stats.tsv"
    stats.write_text("occupation\tbergsma_pct_female\tbls_pct_female\nnurse\t90\t88\nchef\tlots\t20\n")
    with pytest.raises(FairforgetError, match=r"stats.tsv:3"):
        load_occupation_stats(stats, "bergsma")
    stats.write_text("occupation\tbergsma_pct_female\tbls_pct_female\nnurse\t90\t88\n")
    sentences = tmp_path / "s.tsv"
    sentences.write_text("sentid\tsentence\nnurse.patient.1.male.txt\tThe nurse said he.\nbroken id\tx\n")
    with pytest.raises(FairforgetError, match=r"/s\.tsv:3"):
        load_winogender_pairs(sentences, stats)
    with pytest.raises(FairforgetError, match="not found"):
        load_winogender_pairs(tmp_path / "missing.tsv", stats)


def test_group_first_pairs_put_the_group_term_first_and_follow_the_statistic(shared_data):
    from fairforget.pairs import GROUP_FIRST_TEMPLATES, GROUP_TERMS, group_first_pairs, orientation_counts

    stats = shared_data / "winogender" / "data" / "occupations-stats.tsv"
    pct = load_occupation_stats(stats, "bergsma")
    pairs = group_first_pairs(stats, "bergsma")
    assert len(pairs) == len(pct) * len(GROUP_FIRST_TEMPLATES) * len(GROUP_TERMS)
    nurse = [p for p in pairs if p.occupation == "nurse" and p.pair_id.endswith("-0-he")][0]
    assert (nurse.advantaged, nurse.disadvantaged) == ("She is a nurse.", "He is a nurse.")  # mostly women
    engineer = [p for p in pairs if p.occupation == "engineer" and p.pair_id.endswith("-0-he")][0]
    assert (engineer.advantaged, engineer.disadvantaged) == ("He is an engineer.", "She is an engineer.")
    below = sum(v < 50 for v in pct.values())
    per_occupation = len(GROUP_FIRST_TEMPLATES) * len(GROUP_TERMS)
    assert orientation_counts(pairs) == {"group-first-bergsma:female": (len(pct) - below) * per_occupation,
                                         "group-first-bergsma:male": below * per_occupation}


@pytest.mark.parametrize("mode", ["downsample", "upsample"])
def test_balance_gives_equal_orientations_per_source(shared_data, mode):
    from fairforget.pairs import balance_pairs

    folder = shared_data / "winogender" / "data"
    pairs = load_winogender_pairs(folder / "all_sentences.tsv", folder / "occupations-stats.tsv", "bergsma")
    balanced = balance_pairs(pairs, mode, seed=1)
    male = [p for p in balanced if p.adv_gender == "male"]
    female = [p for p in balanced if p.adv_gender == "female"]
    n_female = sum(p.adv_gender == "female" for p in pairs)  # 44: the smaller side
    n_male = len(pairs) - n_female
    assert len(male) == len(female) == (n_female if mode == "downsample" else n_male)
    assert set(balanced) <= set(pairs)
    if mode == "downsample":
        assert len(set(male)) == n_female and set(female) == {p for p in pairs if p.adv_gender == "female"}
    else:  # every female pair at least n_male // n_female times
        counts = {p.pair_id: sum(q.pair_id == p.pair_id for q in female) for p in female}
        assert min(counts.values()) >= n_male // n_female
    assert balance_pairs(pairs, mode, seed=1) == balanced
    assert balance_pairs(pairs, "none") == pairs


def test_stage_10_stereoset_selection_pairs_leave_out_the_choice_sample_and_the_held_out_half(shared_data, tmp_path):
    """The in-domain pair source, checked against dev.json read here: stereotype vs anti-stereotype candidate of
    selection-half gender examples, none of the methods' choice sample, no text of a held-out example."""
    dev = shared_data / "stereoset" / "dev.json"
    stage10 = load_script("10_preprocess_winogender.py")
    run_script(stage10.main, stage10.Config(), [
        "--winogender-dir", str(shared_data / "winogender" / "data"), "--stereoset", str(dev),
        "--sources", "stereoset_selection", "--choice-sample", "40", "--out-dir", str(tmp_path), "--out-name", "s.tsv"])
    pairs = read_pairs_tsv(tmp_path / "s.tsv")
    data = json.loads(dev.read_text())["data"]
    raw = {e["id"]: e for split in ("intrasentence", "intersentence") for e in data[split]}
    intra = {e["id"] for e in data["intrasentence"]}
    examples = load_stereoset(dev)
    selection = {e.id for e in select_half(examples, "selection", 0) if e.bias_type == "gender"}
    choice = {e.id for e in selection_examples(dev, "gender", 40, 0, 0)}
    held_out_texts = set()
    for e in select_half(examples, "heldout", 0):
        for sentence in raw[e.id]["sentences"]:
            held_out_texts.add(" ".join((sentence["sentence"] if e.id in intra
                                         else raw[e.id]["context"] + " " + sentence["sentence"]).split()))
    ids = {p.pair_id.removeprefix("stereoset-") for p in pairs}
    assert ids <= selection - choice and len(choice) == 40 and len(ids) >= len(selection - choice) - 2
    for pair in pairs:
        example = raw[pair.pair_id.removeprefix("stereoset-")]
        by_label = {s["gold_label"]: s["sentence"] for s in example["sentences"]}
        prefix = "" if example["id"] in intra else example["context"] + " "
        assert pair.advantaged == prefix + by_label["stereotype"]
        assert pair.disadvantaged == prefix + by_label["anti-stereotype"]
        assert not {" ".join(pair.advantaged.split()), " ".join(pair.disadvantaged.split())} & held_out_texts
