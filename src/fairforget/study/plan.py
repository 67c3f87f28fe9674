"""The stages of the ``methods`` pipeline preset, read from the method registry: the pair files, every registered
method's stage on one model, then the comparison (stage 30).

Each method runs its own stage script with the flags its registration gives (data, output folders and the
preset's sizes, :attr:`MethodSpec.sizes`: one training epoch per method on all 240 WinoGender pairs, 60-120
selection-half examples for each method's choice, head pruning on 8 BBQ examples per category); stage 30 scores
them all on the same held-out items (:data:`COMPARE_SIZES`: a 200-example StereoSet sample plus every held-out
gender example, 200 CrowS-Pairs, 8 BBQ examples per category of the held-out scenarios, 50 neutral texts).
"""

from __future__ import annotations

from pathlib import Path

from fairforget.layout import Layout
from fairforget.methods.registry import METHODS, stage_name
from fairforget.study.stage import Stage

COMPARE_SIZES = {"stereoset_limit": 200, "gender_limit": None, "crows_limit": 200, "bbq_per_category": 8,
                 "ppl_limit": 50}


def method_stages(spec: str, layout: Layout, base_inputs: list[Path], common: dict) -> list[Stage]:
    """Pairs (stage 10: WinoGender, and group-first for PCGU's configuration), each registered method's stage,
    and stage 30."""
    wino = layout.data / "winogender" / "data"
    wino_files = [wino / "all_sentences.tsv", wino / "occupations-stats.tsv"]
    stages = [Stage(f"10 {label} pairs", "10_preprocess_winogender.py",
                    {"winogender_dir": wino, "out_dir": out.parent, "sources": [source], "out_name": out.name},
                    wino_files, [out], "methods")
              for label, source, out in (("WinoGender", "winogender", layout.pairs),
                                         ("group-first", "group_first", layout.group_first_pairs))]
    folders, records = {}, {}
    for name, method in METHODS.items():
        flags = method.flags(spec, layout, **common)
        folders[name], records[name] = method.folder(layout, flags), method.log_dir(layout) / "method.json"
        stages.append(Stage(stage_name(method), method.script, flags, [*method.inputs(layout), *base_inputs],
                            [method.log_dir(layout), folders[name]], "methods"))
    out = layout.outputs / "methods"
    stages.append(Stage("30 compare methods", "30_compare_methods.py",
                        {"before": spec, "methods": [f"{n}={f}" for n, f in folders.items()],
                         "records": [f"{n}={r}" for n, r in records.items()],
                         "stereoset": layout.stereoset, "crows": layout.crows, "winobias": layout.winobias,
                         "bbq_dir": layout.bbq, "out": out,
                         **COMPARE_SIZES, **common},
                        [layout.stereoset, *folders.values(), *base_inputs],
                        [out / "summary.csv", out / "summary.md", out / "bias_vs_capability.png"], "methods"))
    return stages
