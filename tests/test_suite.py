"""The one held-out suite (fairforget.evals.suite): the items stage 30, stage 22's controls and PCGU's held-out
report are scored on, the scorer with its cache by weights digest, and pairing through each evaluation."""

from __future__ import annotations

from pathlib import Path

from fairforget.evals.bbq import load_bbq
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.crows import load_crows
from fairforget.evals.perplexity import load_neutral_texts
from fairforget.evals.stereoset import load_stereoset, select_half
from fairforget.evals.suite import SuiteConfig, held_out_items, score_items, score_model
from fairforget.methods.head_controls import paired_row, summary_row
from fairforget.methods.pcgu_heldout import HeldOutConfig
from fairforget.models import load_model

CROWS = "crows_pairs/data/crows_pairs_anonymized.csv"


def test_stage_30_items_are_the_held_out_sample_every_gender_example_and_the_unseen_bbq_scenarios(shared_data):
    cfg = SuiteConfig(shared_data / "stereoset/dev.json", shared_data / CROWS, shared_data / "winobias/data",
                      shared_data / "bbq", stereoset_limit=30, crows_limit=20, winobias_limit=6, bbq_per_category=1,
                      ppl_limit=3)
    items = held_out_items(cfg)
    heldout = select_half(load_stereoset(shared_data / "stereoset/dev.json"), "heldout", 0)
    gender = {e.id for e in heldout if e.bias_type == "gender"}
    ids = {e.id for e in items.stereoset}
    assert gender <= ids <= {e.id for e in heldout} and len(ids) == len(items.stereoset)
    assert items.stereoset_sample <= ids and abs(len(items.stereoset_sample) - 30) <= 5
    crows_gender = {p.id for p in load_crows(shared_data / CROWS) if p.bias_type == "gender"}
    assert crows_gender <= {p.id for p in items.crows} and abs(len(items.crows_sample) - 20) <= 5
    mitigation, _ = split_by_scenario(load_bbq(shared_data / "bbq").examples, 0.5, 0)
    assert items.bbq and not {e.scenario for e in items.bbq} & {e.scenario for e in mitigation}
    assert len(items.winobias) == 6 and items.neutral == load_neutral_texts("heldout", 3)
    assert {(e.category, e.example_id) for e in items.bbq} == items.bbq_sample  # no BBQ gender asked for
    with_gender = held_out_items(SuiteConfig(**{**vars(cfg), "bbq_gender_limit": 8}))
    extra = [e for e in with_gender.bbq if (e.category, e.example_id) not in items.bbq_sample]
    assert with_gender.bbq_sample == items.bbq_sample and with_gender.bbq[:len(items.bbq)] == items.bbq
    assert len(extra) in (7, 8) and {e.category for e in extra} == {"Gender_identity"}  # 8, less the sample's own
    assert {e.stratum.split("|", 1)[1] for e in extra} == {f"{c}|{p}" for c in ("ambig", "disambig")
                                                           for p in ("neg", "nonneg")}
    assert not {e.scenario for e in extra} & {e.scenario for e in mitigation}


def test_pcgu_report_items_are_the_gender_examples_and_gender_pairs_only(shared_data):
    cfg = HeldOutConfig("m", shared_data / "stereoset/dev.json", shared_data / CROWS, heldout_limit=0,
                        heldout_gender=True, perplexity_texts=4, completion_tokens=0, start_cache=None, half_seed=0,
                        eval_batch_size=8, n_boot=20, sample_seed=0, device="cpu")
    items = held_out_items(cfg.suite())
    heldout = select_half(load_stereoset(shared_data / "stereoset/dev.json"), "heldout", 0)
    assert [e.id for e in items.stereoset] == [e.id for e in heldout if e.bias_type == "gender"]
    assert not items.stereoset_sample and not items.winobias and not items.bbq
    assert [p.id for p in items.crows] == [p.id for p in load_crows(shared_data / CROWS) if p.bias_type == "gender"]
    assert len(items.neutral) == 4


def test_a_model_is_scored_once_per_setting_and_pairs_with_itself_as_no_change(tmp_path, tokenizer, shared_data,
                                                                               capsys):
    from fairforget.tiny import save_tiny_model

    folder = str(save_tiny_model("llama", tokenizer, tmp_path / "tiny"))
    bbq = load_bbq(shared_data / "bbq", ["Age"]).examples[:6]
    cfg = SuiteConfig(shared_data / "stereoset/dev.json", shared_data / CROWS, None, None, stereoset_limit=6,
                      gender_limit=4, crows_limit=6, crows_gender=False, ppl_limit=3, bbq_mode="letter",
                      chat_template="off", batch_size=8, n_boot=20, device="cpu")
    items = held_out_items(cfg, bbq)
    assert len(items.crows) == len(items.crows_sample) and items.bbq == bbq  # the caller's BBQ items
    first = score_model("m", folder, items, cfg, tmp_path / "cache", load_model)
    assert set(first["scores"]) == {"stereoset", "crows", "bbq", "perplexity"}
    again = score_model("m", folder, items, cfg, tmp_path / "cache", load_model)
    assert "m: reusing the scores" in capsys.readouterr().out
    assert again["scores"]["stereoset"][1] == first["scores"]["stereoset"][1]
    other = SuiteConfig(**{**vars(cfg), "n_boot": 30})
    score_model("m", folder, items, other, tmp_path / "cache", load_model)
    assert "reusing" not in capsys.readouterr().out  # other settings: scored again
    loaded = load_model(folder, "cpu")
    only_bbq = score_items(loaded.model, loaded.tokenizer, items.only("bbq"), cfg)
    assert set(only_bbq) == {"bbq"}
    row = paired_row(first["scores"], again["scores"], items, cfg)
    assert row["d_ss_gender"] == row["d_ss_overall"] == row["d_crows"] == row["d_ppl_pct"] == row["d_s_amb"] == 0
    assert row["p_ss_gender"] == row["p_crows"] == 1.0
    level = summary_row(first["scores"], items, 20, 0)
    assert level["n_stereoset_overall"] == len(items.stereoset_sample) and Path(folder).is_dir()


def test_a_model_whose_head_alone_differs_is_scored_by_its_head_with_the_scores_it_gets_alone(tmp_path, tokenizer,
                                                                                              shared_data):
    import torch

    from fairforget.artifacts import save_model
    from fairforget.methods.projection import fold, untie_head
    from fairforget.scoring import BodyOutputs, backbone_and_head
    from fairforget.tiny import save_tiny_model

    before = str(save_tiny_model("llama", tokenizer, tmp_path / "before"))
    other = str(save_tiny_model("llama", tokenizer, tmp_path / "other", seed=1))
    folded = load_model(before, "cpu").model
    direction = torch.nn.functional.normalize(torch.arange(1.0, folded.config.hidden_size + 1), dim=0)
    fold(folded, untie_head(folded)[0], (torch.eye(len(direction)) - torch.outer(direction, direction)).double())
    projected = str(save_model(folded, tokenizer, tmp_path / "projected"))
    cfg = SuiteConfig(shared_data / "stereoset/dev.json", shared_data / CROWS, shared_data / "winobias/data", None,
                      stereoset_limit=6, gender_limit=4, crows_limit=6, winobias_limit=4, ppl_limit=3,
                      batch_size=4, n_boot=20, device="cpu")
    items = held_out_items(cfg, [])
    body_runs = []

    def counting_load(spec, device):
        loaded = load_model(spec, device)
        body, _ = backbone_and_head(loaded.model)
        forward = body.forward
        body.forward = lambda *a, **k: body_runs.append(spec) or forward(*a, **k)
        return loaded

    shared = BodyOutputs()
    scored = {spec: score_model(spec, spec, items, cfg, tmp_path / "shared", counting_load, shared=shared)["scores"]
              for spec in (before, projected, other)}
    assert body_runs.count(before) > 0 and body_runs.count(projected) == 0  # the head alone ran for it
    assert body_runs.count(other) == body_runs.count(before)  # other weights: its body runs
    for spec in (projected, other):
        alone = score_model(spec, spec, items, cfg, tmp_path / "alone", load_model)["scores"]
        assert alone == scored[spec]
    assert scored[projected]["winobias"][1] != scored[before]["winobias"][1]
