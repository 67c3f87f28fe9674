"""The stages of the ``methods`` pipeline preset: every method on one model, then the comparison (stage 30).

Sizes (:data:`SIZES`) are the reduced CPU budget the README's comparison ran with on a shared 2-core machine:
one training epoch per method (BiasUnlearn on the first 80 pairs), 20-30 selection-half examples for choices,
head pruning on 4 BBQ examples per category with BBQ-only evaluation and one random-heads draw, and the
held-out items of stage 30 below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fairforget.models import model_name

SIZES = {"cda": {"epochs": 1}, "task_vector": {"epochs": 1, "lambdas": [1.0, 2.0], "selection_limit": 30},
         "self_debias": {"selection_limit": 20},
         "bias_unlearn": {"epochs": 1, "limit": 80, "check_every": 5, "check_pairs": 16},
         "compare": {"stereoset_limit": 30, "gender_limit": 45, "crows_limit": 40, "bbq_per_category": 2, "ppl_limit": 12}}
METHOD_SCRIPTS = {"cda": "31_cda.py", "task_vector": "32_task_vector.py", "self_debias": "33_self_debias.py",
                  "bias_unlearn": "34_bias_unlearn.py"}


def method_stages(spec: str, layout: Any, base_inputs: list[Path], common: dict, scripts: Path) -> list:
    """Pairs (stage 10), stages 31-34, PCGU and head pruning measured by stage 35, and stage 30."""
    from fairforget.pipeline import Stage

    data, mdir, odir = layout.data, layout.models / "methods", layout.outputs / "methods"
    wino, pairs, stereo = data / "winogender" / "data", data / "processed" / "pairs.tsv", data / "stereoset" / "dev.json"
    swaps = [data / "winobias" / "generalized_swaps.txt", data / "winobias" / "extra_gendered_words.txt"]
    recovered = layout.models / "recovered" / model_name(spec)
    stages = [Stage("10 WinoGender pairs", "10_preprocess_winogender.py",
                    {"winogender_dir": wino, "out_dir": data / "processed"},
                    [wino / "all_sentences.tsv", wino / "occupations-stats.tsv"], [data / "processed"], "methods")]
    inputs = {"cda": [pairs, *swaps], "task_vector": [pairs, stereo], "self_debias": [stereo], "bias_unlearn": [pairs]}
    for name, script in METHOD_SCRIPTS.items():
        args = {"model": spec, "out": mdir / name, "log_dir": odir / name, **SIZES[name], **common}
        if name != "self_debias":
            args["pairs"] = pairs
        stages.append(Stage(f"{script[:2]} {name}", script, args, [*inputs[name], *base_inputs],
                            [mdir / name, odir / name], "methods"))
    measured = {
        "pcgu": (mdir / "pcgu", [pairs, stereo], f"{scripts / '12_pcgu_unlearn.py'} --model {spec} --pairs {pairs} "
                 f"--stereoset {stereo} --out {mdir / 'pcgu'} --log-dir {odir / 'pcgu_log'} --epochs 1 "
                 f"--selection-limit 20"),
        "head_pruning": (recovered, [data / "bbq"], f"{scripts / '22_mitigate_heads.py'} --model {spec} "
                         f"--data-dir {data / 'bbq'} --mitigation-per-category 4 --eval-per-category 4 --signal-limit 30 "
                         f"--evals bbq --random-draws 1 --dose-ks 20 --dose-random-draws 0 "
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
