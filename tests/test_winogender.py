"""WinoGender / WinoBias pairs: the advantaged side follows the occupation statistic; files are validated."""

import csv

import pytest

from fairforget.errors import FairforgetError
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
