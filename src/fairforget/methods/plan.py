"""The stages of the ``methods`` pipeline preset: every method on one model, then the comparison (stage 30).

Sizes (:data:`SIZES`) fit the preset in well under an hour on a quiet 2-core CPU: one training epoch per
method on all 240 WinoGender pairs, 60-120 selection-half examples for each method's choice, head pruning on 8
BBQ examples per category (BBQ-only evaluation, two random-heads draws), and stage 30's held-out items: a
200-example StereoSet sample plus every held-out gender example, 200 CrowS-Pairs, 8 BBQ examples per category
of the held-out scenarios and 50 neutral texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fairforget.models import model_name
from fairforget.pipeline import Stage

SIZES = {"cda": {"epochs": 1}, "task_vector": {"epochs": 1, "lambdas": [1.0, 2.0, 4.0], "selection_limit": 120},
         "self_debias": {"selection_limit": 60},
         "bias_unlearn": {"epochs": 1, "limit": 0, "check_every": 10, "check_pairs": 32},
         "compare": {"stereoset_limit": 200, "gender_limit": None, "crows_limit": 200, "bbq_per_category": 8,
                     "ppl_limit": 50}}
PCGU_CONFIG = "gf_after_dyn_bal_lr1e-3"  # configs/pcgu/: the ablation's choice on the selection half (README)
METHOD_SCRIPTS = {"cda": "31_cda.py", "task_vector": "32_task_vector.py", "self_debias": "33_self_debias.py",
                  "bias_unlearn": "34_bias_unlearn.py"}


def method_stages(spec: str, layout: Any, base_inputs: list[Path], common: dict, scripts: Path) -> list:
    """Pairs (stage 10: WinoGender, and group-first for PCGU's configuration), stages 31-34, PCGU and head
    pruning measured by stage 35, and stage 30."""
    data, mdir, odir = layout.data, layout.models / "methods", layout.outputs / "methods"
    wino, pairs, stereo = data / "winogender" / "data", data / "processed" / "pairs.tsv", data / "stereoset" / "dev.json"
    group_first = data / "processed" / "pairs_group_first.tsv"
    pcgu_config = scripts.parent / "configs" / "pcgu" / f"{PCGU_CONFIG}.json"
    swaps = [data / "winobias" / "generalized_swaps.txt", data / "winobias" / "extra_gendered_words.txt"]
    recovered = layout.models / "recovered" / model_name(spec)
    wino_files = [wino / "all_sentences.tsv", wino / "occupations-stats.tsv"]
    stages = [Stage(f"10 {label} pairs", "10_preprocess_winogender.py",
                    {"winogender_dir": wino, "out_dir": data / "processed", "sources": [source], "out_name": out.name},
                    wino_files, [out], "methods")
              for label, source, out in (("WinoGender", "winogender", pairs), ("group-first", "group_first", group_first))]
    inputs = {"cda": [pairs, *swaps], "task_vector": [pairs, stereo], "self_debias": [stereo], "bias_unlearn": [pairs]}
    for name, script in METHOD_SCRIPTS.items():
        args = {"model": spec, "out": mdir / name, "log_dir": odir / name, **SIZES[name], **common}
        if name != "self_debias":
            args["pairs"] = pairs
        stages.append(Stage(f"{script[:2]} {name}", script, args, [*inputs[name], *base_inputs],
                            [mdir / name, odir / name], "methods"))
    measured = {
        "pcgu": (mdir / "pcgu", [group_first, stereo, pcgu_config], f"{scripts / '12_pcgu_unlearn.py'} --config "
                 f"{pcgu_config} --model {spec} --pairs {group_first} "
                 f"--stereoset {stereo} --out {mdir / 'pcgu'} --log-dir {odir / 'pcgu_log'} --no-heldout-eval"),
        "head_pruning": (recovered, [data / "bbq"], f"{scripts / '22_mitigate_heads.py'} --model {spec} "
                         f"--data-dir {data / 'bbq'} --mitigation-per-category 8 --eval-per-category 8 --signal-limit 60 "
                         f"--evals bbq --random-draws 2 --dose-ks 20 --dose-random-draws 0 "
                         f"--recovery-epochs 1 --localize-per-category 0 --models-dir {layout.models} "
                         f"--out {layout.outputs / 'mitigation' / model_name(spec)}")}
    for name, (folder, needs, command) in measured.items():
        stages.append(Stage(f"35 {name} (measured)", "35_measure_stage.py",
                            {"method": name, "model_folder": folder, "log_dir": odir / name, "command": command},
                            [*needs, *base_inputs], [odir / name, folder], "methods"))
    folders = {**{n: mdir / n for n in METHOD_SCRIPTS}, "pcgu": mdir / "pcgu", "head_pruning": recovered}
    stages.append(Stage("30 compare methods", "30_compare_methods.py",
                        {"before": spec, "methods": [f"{n}={f}" for n, f in folders.items()],
                         "records": [f"{n}={odir / n / 'method.json'}" for n in folders],
                         "stereoset": stereo, "crows": data / "crows_pairs" / "data" / "crows_pairs_anonymized.csv",
                         "bbq_dir": data / "bbq", "out": odir, **SIZES["compare"], **common},
                        [stereo, *folders.values(), *base_inputs],
                        [odir / "summary.csv", odir / "summary.md", odir / "bias_vs_capability.png"], "methods"))
    return stages
