"""The stages of the ``methods`` and ``controls`` pipeline presets, read from the method registry: the pair files,
every registered method's stage on one model, then the comparison (stage 30). The controls plan first plants a
gender bias (stage 16) and runs every method on the planted model (:func:`control_stages`); its BBQ part plants
a BBQ bias and runs head pruning with its controls on it (:func:`bbq_control_stages`).

Each method runs its own stage script with the flags its registration gives (data, output folders and the
preset's sizes, :attr:`MethodSpec.sizes`: one training epoch per method on all 240 WinoGender pairs, 60-120
selection-half examples for each method's choice, head pruning on 8 BBQ examples per category); stage 30 scores
them all on the same held-out items (:data:`COMPARE_SIZES`: a 200-example StereoSet sample plus every held-out
gender example, 200 CrowS-Pairs, 8 BBQ examples per category of the held-out scenarios, 50 neutral texts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from fairforget.layout import Layout
from fairforget.methods.registry import METHODS, method, stage_name
from fairforget.study.compare import pair_source_run
from fairforget.study.seeds import seed_run
from fairforget.study.stage import Stage

CONTROLS = "controls"  # the controls preset's pipeline label and folder group
BBQ_CONTROL = "controls_bbq"  # its BBQ part: head pruning on a planted BBQ bias
FRONTIER = "frontier"  # the frontier preset's pipeline label and folder group
BBQ_CONTROL_START = "controls_bbq_start"  # the same head pruning on the unplanted model
COMPARE_SIZES = {"stereoset_limit": 200, "gender_limit": None, "crows_limit": 200, "bbq_per_category": 8,
                 "ppl_limit": 50}


def method_stages(spec: str, layout: Layout, base_inputs: list[Path], common: dict) -> list[Stage]:
    """Pairs (stage 10: WinoGender, and group-first for PCGU's configuration), each registered method's stage,
    and stage 30."""
    runs, folders, records = method_runs(spec, layout, base_inputs, common, "methods")
    out = layout.outputs / "methods" / "comparison"  # beside the methods' own log folders, not above them
    return [*pair_stages(layout, "methods"), *runs,
            compare_stage(spec, folders, records, layout, out, [*base_inputs], {**COMPARE_SIZES, **common}, "methods")]


def pair_stages(layout: Layout, pipeline: str) -> list[Stage]:
    """Stage 10 twice: the WinoGender pairs and the group-first pairs the methods train on."""
    wino = layout.data / "winogender" / "data"
    wino_files = [wino / "all_sentences.tsv", wino / "occupations-stats.tsv"]
    return [Stage(f"10 {label} pairs", "10_preprocess_winogender.py",
                  {"winogender_dir": wino, "out_dir": out.parent, "sources": [source], "out_name": out.name},
                  wino_files, [out], pipeline)
            for label, source, out in (("WinoGender", "winogender", layout.pairs),
                                       ("group-first", "group_first", layout.group_first_pairs))]


def frontier_folders(layout: Layout, group: str) -> dict[str, Path]:
    """Each setting-saving method's ``--settings-dir`` under ``group``: stage 30's ``--frontiers``."""
    return {n: m.in_group(group).settings_dir(layout) for n, m in METHODS.items() if m.saves_settings}


def source_pairs_stage(layout: Layout, source: str, out: Path, pipeline: str) -> Stage:
    """Stage 10 writing one pair source (``stereoset_selection``: the selection half's candidates, never the
    held-out half or the methods' choice sample) to ``out``."""
    wino = layout.data / "winogender" / "data"
    inputs = [wino / "all_sentences.tsv", wino / "occupations-stats.tsv", layout.stereoset,
              *([layout.winobias] if source == "winobias" else [])]
    return Stage(f"10 {source} pairs", "10_preprocess_winogender.py",
                 {"winogender_dir": wino, "winobias_dir": layout.winobias, "stereoset": layout.stereoset,
                  "out_dir": out.parent, "sources": [source], "out_name": out.name}, inputs, [out], pipeline)


def method_runs(spec: str, layout: Layout, base_inputs: list[Path], common: dict, group: str,
                flags: Callable[[str], dict] = lambda script: {}, names: Sequence[str] | None = None,
                settings: bool = False, suffix: str = "") -> tuple[list[Stage], dict[str, Path], dict[str, Path]]:
    """Every registered method's stage (or those of ``names``) on the start model ``spec``, writing under
    ``models/<group>/<name>`` and ``outputs/<group>/<name>`` (``flags(script)``: the preset's flags of that stage
    script, over the registered sizes; with ``settings``, a method that can also saves every setting's model,
    its frontier; ``suffix`` ends each stage's name); returns the stages, each method's final output folder and its
    method.json."""
    stages, folders, records = [], {}, {}
    for name, registered in METHODS.items():
        if names is not None and name not in names:
            continue
        method = registered.in_group(group)
        frontier = {"settings_dir": method.settings_dir(layout)} if settings and method.saves_settings else {}
        stage_flags = method.flags(spec, layout, **flags(method.script), **frontier, **common)
        folders[name], records[name] = method.folder(layout, stage_flags), method.log_dir(layout) / "method.json"
        stages.append(Stage(stage_name(method) + suffix, method.script, stage_flags,
                            [*method.inputs(layout), *base_inputs],
                            [method.log_dir(layout), folders[name], *frontier.values()], group))
    return stages, folders, records


def frontier_stages(spec: str, layout: Layout, base_inputs: list[Path], common: dict, flags: Callable[[str], dict],
                    seeds: Sequence[int], seeded: Sequence[str],
                    pair_sources: dict[str, Sequence[str]] | None = None) -> list[Stage]:
    """The frontier plan: the pairs, every registered method's stage on ``spec`` with its first seed (saving every
    setting of the methods that can: ``models/frontier/<name>_settings``), the methods of ``seeded`` again with each
    other seed (``models/frontier_seed<N>/<name>``, named ``<name>:seed<N>`` in the comparison), the methods of
    ``pair_sources[source]`` again on that stage-10 pair source (``models/frontier_<source>/<name>``, named
    ``<name>+<source>``: in-domain against transfer training data), then stage 30 with every chosen model,
    replicate, pair-source run and frontier, into ``outputs/frontier/comparison``."""
    first, *others = seeds
    runs, folders, records = method_runs(spec, layout, base_inputs, {**common, "seed": first}, FRONTIER, flags,
                                         settings=True)
    for seed in others:
        more, seed_folders, seed_records = method_runs(spec, layout, base_inputs, {**common, "seed": seed},
                                                       f"{FRONTIER}_seed{seed}", flags, names=seeded,
                                                       suffix=f" seed {seed}")
        runs += more
        folders.update({seed_run(n, seed): f for n, f in seed_folders.items()})
        records.update({seed_run(n, seed): r for n, r in seed_records.items()})
    sources = []
    for source, names in (pair_sources or {}).items():
        pairs = layout.pairs.parent / f"pairs_{source}.tsv"
        sources.append(source_pairs_stage(layout, source, pairs, FRONTIER))
        more, source_folders, source_records = method_runs(
            spec, layout, [*base_inputs, pairs], {**common, "seed": first}, f"{FRONTIER}_{source}",
            lambda script: {**flags(script), "pairs": pairs}, names=names, suffix=f" on {source} pairs")
        runs += more
        folders.update({pair_source_run(n, source): f for n, f in source_folders.items()})
        records.update({pair_source_run(n, source): r for n, r in source_records.items()})
    compare = compare_stage(spec, folders, records, layout, layout.outputs / FRONTIER / "comparison", base_inputs,
                            {**COMPARE_SIZES, **flags("30_compare_methods.py"), **common, "seed": first}, FRONTIER,
                            frontier_folders(layout, FRONTIER))
    return [*pair_stages(layout, FRONTIER), *sources, *runs, compare]


def compare_stage(before: str, folders: dict[str, Path], records: dict[str, Path], layout: Layout, out: Path,
                  inputs: list[Path], flags: dict, pipeline: str, frontiers: dict[str, Path] | None = None) -> Stage:
    """Stage 30: every method's output against ``before`` on the held-out suite, written to ``out``; with
    ``frontiers`` (method -> its --settings-dir), every saved setting too."""
    frontier_flags = {"frontiers": [f"{n}={f}" for n, f in frontiers.items()]} if frontiers else {}
    return Stage("30 compare methods", "30_compare_methods.py",
                 {"before": before, "methods": [f"{n}={f}" for n, f in folders.items()],
                  "records": [f"{n}={r}" for n, r in records.items()],
                  "stereoset": layout.stereoset, "crows": layout.crows, "winobias": layout.winobias,
                  "bbq_dir": layout.bbq, "out": out, **flags, **frontier_flags},
                 [layout.stereoset, *folders.values(), *inputs, *(frontiers or {}).values()],
                 [out / "summary.csv", out / "summary.md", out / "bias_vs_capability.png"], pipeline)


def control_stages(spec: str, layout: Layout, base_inputs: list[Path], common: dict,
                   flags: Callable[[str], dict], frontier: bool = False) -> list[Stage]:
    """The controls plan: the pairs, stage 16 planting the gender bias into ``spec`` (the preset's stage-16
    flags: the README recipe, --no-heldout), every registered method started from the planted model into
    ``models/controls/<name>`` / ``outputs/controls/<name>`` (the preset's flags of its script over its
    registered sizes; with ``frontier``, every setting saved where the method can), then stage 30 with the planted
    model as before and ``spec`` as --start (the share of the planted shift each method removes; the frontiers),
    into ``outputs/controls/comparison``."""
    planted, log_dir = layout.models / "planted" / "controls-gender", layout.outputs / "planted" / "controls-gender"
    plant = Stage("16 plant gender bias", "16_plant_bias.py",
                  {"kind": "gender", "model": spec, "out": planted, "log_dir": log_dir, "stereoset": layout.stereoset,
                   "crows": layout.crows, "winobias_dir": layout.winobias, "heldout": False,
                   **flags("16_plant_bias.py"), **common},
                  [layout.stereoset, layout.crows, *base_inputs], [planted, log_dir], CONTROLS)
    runs, folders, records = method_runs(str(planted), layout, [planted], common, CONTROLS, flags, settings=frontier)
    compare = compare_stage(str(planted), folders, records, layout, layout.outputs / CONTROLS / "comparison",
                            [planted, *base_inputs],
                            {"start": spec, **COMPARE_SIZES, **flags("30_compare_methods.py"), **common}, CONTROLS,
                            frontier_folders(layout, CONTROLS) if frontier else None)
    return [*pair_stages(layout, CONTROLS), plant, *runs, compare]


def bbq_control_stages(spec: str, layout: Layout, base_inputs: list[Path], common: dict,
                       flags: Callable[[str], dict]) -> list[Stage]:
    """The controls plan's BBQ part: stage 16 plants the BBQ bias into ``spec`` (the preset's ``bbq_stages``
    flags: the README recipe), then head pruning (stage 22, with its controls: random heads, recovery only) on
    the planted model, into ``models/controls_bbq/head_pruning`` / ``outputs/controls_bbq/head_pruning``, and
    the same stage 22 on the unplanted ``spec`` (``.../controls_bbq_start/head_pruning``): whether the planted
    bias changes which heads are chosen."""
    planted, log_dir = layout.models / "planted" / "controls-bbq", layout.outputs / "planted" / "controls-bbq"
    plant = Stage("16 plant BBQ bias", "16_plant_bias.py",
                  {"kind": "bbq", "model": spec, "out": planted, "log_dir": log_dir, "bbq_dir": layout.bbq,
                   **flags("16_plant_bias.py"), **common},
                  [layout.bbq, *base_inputs], [planted, log_dir], BBQ_CONTROL)
    stages = [plant]
    for model, model_files, group, label in ((str(planted), [planted], BBQ_CONTROL, "the planted BBQ model"),
                                             (spec, base_inputs, BBQ_CONTROL_START, "the unplanted model")):
        heads = method("head_pruning").in_group(group)
        heads_flags = heads.flags(model, layout, **flags(heads.script), **common)
        stages.append(Stage(f"{stage_name(heads)} on {label}", heads.script, heads_flags,
                            [*heads.inputs(layout), *model_files],
                            [heads.log_dir(layout), heads.folder(layout, heads_flags)], BBQ_CONTROL))
    return stages
