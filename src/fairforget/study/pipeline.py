"""The whole study as a list of stage runs: presets, skip-if-done records, and running each stage script.

Each stage is exactly the command a user would type (``python scripts/NN_*.py --flag value ...``), run as a
subprocess. After it succeeds, a record ``.stage.json`` goes next to its outputs: the stage's fingerprint
(sha256 of the script, of the fairforget library's code, the versions of the packages it runs on, its
resolved arguments and the sha256 of every input file; folders hash every file in them) and the sha256 of
what it wrote. A later run skips a stage whose record matches the current fingerprint and whose outputs are
still there unchanged; any change in arguments, inputs (e.g. a re-trained model upstream), the script, the
library or a package version runs it again. ``force`` redoes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from fairforget.artifacts import package_versions, read_json, write_json
from fairforget.datasets import data_problem, dataset_files
from fairforget.errors import FairforgetError
from fairforget.hashing import Hasher
from fairforget.layout import CONFIGS, REPO, SCRIPTS, Layout
from fairforget.methods.registry import METHODS
from fairforget.models import EMBEDDED_DIR, EMBEDDED_PREFIX, embedded_folder, model_name
from fairforget.pairs import PAIR_SOURCES
from fairforget.run_folders import beside, run_problem
from fairforget.study.plan import bbq_control_stages, control_stages, frontier_stages, method_stages
from fairforget.study.stage import ATOMIC_RUN_SCRIPTS, Stage

PIPELINES = ("pcgu", "bbq")
def fingerprint(stage: Stage, hasher: Hasher) -> dict[str, Any]:
    """What the stage's result depends on: its script, the library code, the package versions, its resolved
    arguments and its input files."""
    script = SCRIPTS / stage.script
    return {"script": stage.script, "script_sha256": hasher.file(script), "library_sha256": hasher.library(),
            "packages": package_versions(), "args": stage.argv(),
            "inputs": {str(p): hasher.path(p) for p in stage.inputs}}


def fingerprint_hash(print_: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()


def why_not_done(stage: Stage, hasher: Hasher) -> str | None:
    """None when the stage's outputs exist and match its record for the current fingerprint; else the reason.
    The data step is re-verified against the pinned manifest every time, not trusted from its record."""
    if not stage.record.is_file():
        return "not run yet"
    if stage.script == "00_fetch_data.py" and (problem := data_problem(stage.args["out"])):
        return problem
    if stage.script in ATOMIC_RUN_SCRIPTS and (problem := run_problem(stage.outputs[0])):
        return f"output {stage.outputs[0]} is {problem}"
    try:
        record = read_json(stage.record, "stage record")
    except FairforgetError:
        return "its stage record is unreadable"
    current = fingerprint(stage, hasher)
    if record.get("fingerprint_sha256") != fingerprint_hash(current):
        old = record.get("fingerprint", {})
        changed = [k for k in ("script_sha256", "library_sha256", "packages", "args") if old.get(k) != current[k]]
        changed += [f"input {p}" for p, h in current["inputs"].items() if old.get("inputs", {}).get(p) != h]
        return "changed: " + (", ".join(changed) if changed else "fingerprint")
    for path, digest in record.get("outputs", {}).items():
        if hasher.path(Path(path)) != digest:
            return f"output {path} is missing or was modified"
    return None


def write_record(stage: Stage, hasher: Hasher, seconds: float) -> None:
    current = fingerprint(stage, hasher)
    write_json(stage.record, {"stage": stage.name, "fingerprint_sha256": fingerprint_hash(current),
                              "fingerprint": current, "outputs": {str(p): hasher.path(p) for p in stage.outputs},
                              "wall_seconds": round(seconds, 1),
                              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


# ---- running ------------------------------------------------------------------------------------------------

@dataclass
class StageResult:
    name: str
    pipeline: str
    status: Literal["ran", "skipped", "failed", "missing"]
    seconds: float
    note: str = ""
    command: str = ""


def run_stages(stages: Sequence[Stage], force: bool = False, nproc: int = 1, cwd: Path | None = None,
               log: Callable[[str], None] = print, env: dict[str, str] | None = None) -> list[StageResult]:
    """Run ``stages`` in order, skipping those already done; stop at the first failure (its error printed)."""
    hasher = Hasher()
    results: list[StageResult] = []
    for k, stage in enumerate(stages, start=1):
        head = f"[{k}/{len(stages)}] {stage.name}"
        command = stage.command(nproc)
        shown = " ".join(command[1:]).replace(str(REPO) + "/", "")
        if not (SCRIPTS / stage.script).is_file():
            log(f"{head}: skipped, scripts/{stage.script} is not in this checkout yet")
            results.append(StageResult(stage.name, stage.pipeline, "missing", 0.0, "script not present", shown))
            continue
        absent = [str(p) for p in stage.inputs if not p.exists()]
        if absent:
            log(f"{head}: skipped, its inputs are missing: {', '.join(absent)}")
            results.append(StageResult(stage.name, stage.pipeline, "missing", 0.0,
                                       "inputs missing: " + ", ".join(absent), shown))
            continue
        reason = "forced" if force else why_not_done(stage, hasher)
        if reason is None:
            log(f"{head}: done before with the same config and inputs, skipped")
            record = read_json(stage.record, "stage record")
            results.append(StageResult(stage.name, stage.pipeline, "skipped", record.get("wall_seconds", 0.0),
                                       "up to date", shown))
            continue
        log(f"{head} ({reason}): {shown}")
        start = time.perf_counter()
        returncode, errors = _run_streaming(command, cwd, dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), log)
        seconds = time.perf_counter() - start
        if returncode != 0:
            log(f"{head} FAILED after {seconds:.0f} s (exit {returncode}):\n" + "\n".join(errors[-15:]))
            message = [line for line in errors if line.startswith("error: ")] or errors or [f"exit {returncode}"]
            results.append(StageResult(stage.name, stage.pipeline, "failed", seconds, message[-1], shown))
            break
        write_record(stage, hasher, seconds)
        log(f"    ({seconds:.0f} s)")
        results.append(StageResult(stage.name, stage.pipeline, "ran", seconds, "", shown))
    return results


def _run_streaming(command: list[str], cwd: Path | None, env: dict[str, str],
                   log: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run ``command``, passing its stdout lines to ``log`` as they come; return (exit status, stderr lines)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as errors:
        with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors, text=True) as proc:
            for line in proc.stdout:
                if line.strip():
                    log(f"    {line.rstrip()}")
        errors.seek(0)
        return proc.returncode, [line.rstrip() for line in errors if line.strip()]


# ---- presets ------------------------------------------------------------------------------------------------

PRESET_KEYS = ("description", "plan", "pcgu_model", "bbq_model", "stages", "bbq_stages", "seeds", "seeded",
               "pair_sources", "frontier")


def load_preset(preset: str) -> dict[str, Any]:
    """A preset: ``configs/<name>.json`` or a JSON file of the same shape (copy one to make your own): the two
    pipelines' models and, per stage script, the flags it gets on top of the pipeline's paths (``stages``; the
    controls plan's BBQ part reads ``bbq_stages``)."""
    path = Path(preset) if preset.endswith(".json") else CONFIGS / f"{preset}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise FairforgetError(f"unknown preset {preset!r}: {path} not found (presets: {known}, or a .json file)")
    chosen = read_json(path, "preset")
    if not isinstance(chosen, dict):
        raise FairforgetError(f"preset {path} must hold a JSON object")
    unknown = [k for k in chosen if k not in PRESET_KEYS]
    missing = [k for k in ("pcgu_model", "bbq_model") if not isinstance(chosen.get(k), str)]
    if unknown or missing:
        raise FairforgetError(f"preset {path}: unknown key(s) {unknown} / missing model(s) {missing}; "
                              f"keys: {', '.join(PRESET_KEYS)}")
    seeds, seeded = chosen.get("seeds", [0]), chosen.get("seeded", [])
    if not (isinstance(seeds, list) and seeds and all(isinstance(v, int) for v in seeds)
            and len(set(seeds)) == len(seeds)):
        raise FairforgetError(f"preset {path}: 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    if not isinstance(seeded, list) or [n for n in seeded if n not in METHODS]:
        raise FairforgetError(f"preset {path}: 'seeded' must list registered methods ({', '.join(METHODS)}), "
                              f"got {seeded!r}")
    sources = chosen.get("pair_sources", {})
    if not isinstance(sources, dict) or any(s not in PAIR_SOURCES or not isinstance(n, list) or set(n) - set(METHODS)
                                            for s, n in sources.items()):
        raise FairforgetError(f"preset {path}: 'pair_sources' maps a stage-10 source ({', '.join(PAIR_SOURCES)}) to "
                              f"a list of registered methods, got {sources!r}")
    if not isinstance(chosen.get("frontier", False), bool):
        raise FairforgetError(f"preset {path}: 'frontier' must be true or false (the controls plan: also save every "
                              f"setting of the methods that can), got {chosen['frontier']!r}")
    for key in ("stages", "bbq_stages"):
        for script, flags in chosen.setdefault(key, {}).items():
            if not (SCRIPTS / script).is_file():
                raise FairforgetError(f"preset {path}: {key!r} names {script!r}, which is not a script in {SCRIPTS}")
            if not isinstance(flags, dict):
                raise FairforgetError(f"preset {path}: the flags of {script} must be a JSON object")
    return chosen


def model_inputs(spec: str, layout: Layout) -> list[Path]:
    """The files a model spec stands for: the converted folder of an embedded model, a local folder itself
    (an adapter's base is covered by the stage that made it), nothing for a hub id (named in the args)."""
    if spec.startswith(EMBEDDED_PREFIX):
        return [embedded_folder(spec, layout.models / EMBEDDED_DIR.name)]
    return [Path(spec)] if Path(spec).exists() else []


def dataset_inputs(dataset: str, layout: Layout, only: Sequence[str] = ()) -> list[Path]:
    return [layout.data / spec.file for spec in dataset_files(dataset)
            if not only or any(part in spec.file for part in only)]


def build_plan(preset: str, pipelines: Sequence[str] = PIPELINES, data_source: Path | None = None,
               device: str = "auto", seed: int = 0, layout: Layout = Layout(), pcgu_model: str | None = None,
               bbq_model: str | None = None) -> list[Stage]:
    """The stages of ``preset`` (a name in configs/ or a preset file) for the chosen pipelines, in order."""
    chosen = load_preset(preset)
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown or not pipelines:
        raise FairforgetError(f"--pipelines takes one or more of {', '.join(PIPELINES)}; got {list(pipelines)}")
    flags = lambda script: dict(chosen["stages"].get(script, {}))  # noqa: E731
    out, data = layout.outputs, layout.data
    stages = [Stage("00 fetch data", "00_fetch_data.py", {"out": data, "source": data_source},
                    outputs=[data / "MANIFEST.json"])]
    models = [pcgu_model or chosen["pcgu_model"]] if "pcgu" in pipelines else []
    if "bbq" in pipelines:
        models.append(bbq_model or chosen["bbq_model"])
    for spec in dict.fromkeys(models):
        name = model_name(spec)
        folder = embedded_folder(spec, layout.models / EMBEDDED_DIR.name) if spec.startswith(EMBEDDED_PREFIX) else None
        stages.append(Stage(f"01 prepare {name}", "01_prepare_model.py",
                            {"model": spec, "models_dir": layout.models / EMBEDDED_DIR.name, "device": "cpu"},
                            outputs=[folder or out / "prepared" / name]))
    common = {"seed": seed, "device": device}
    if chosen.get("plan") == "methods":
        spec = pcgu_model or chosen["pcgu_model"]
        return stages + method_stages(spec, layout, model_inputs(spec, layout), common)
    if chosen.get("plan") == "frontier":
        spec = pcgu_model or chosen["pcgu_model"]
        return stages + frontier_stages(spec, layout, model_inputs(spec, layout), common, flags,
                                        chosen.get("seeds", [seed]), chosen.get("seeded", []),
                                        chosen.get("pair_sources", {}))
    if chosen.get("plan") == "controls":  # pcgu: the gender control of every method; bbq: head pruning's
        if "pcgu" in pipelines:
            spec = pcgu_model or chosen["pcgu_model"]
            stages += control_stages(spec, layout, model_inputs(spec, layout), common, flags,
                                     chosen.get("frontier", False))
        if "bbq" in pipelines:
            spec = bbq_model or chosen["bbq_model"]
            stages += bbq_control_stages(spec, layout, model_inputs(spec, layout), common,
                                         lambda script: dict(chosen["bbq_stages"].get(script, {})))
        return stages
    if "pcgu" in pipelines:
        stages += _pcgu_stages(pcgu_model or chosen["pcgu_model"], flags, layout, common)
    if "bbq" in pipelines:
        stages += _bbq_stages(bbq_model or chosen["bbq_model"], flags, layout, common)
    return stages


def _pcgu_stages(spec: str, flags: Callable[[str], dict], layout: Layout, common: dict) -> list[Stage]:
    name, out, data = model_name(spec), layout.outputs, layout.data
    base_in = model_inputs(spec, layout)
    mdir = layout.models / name
    finetuned, debiased = mdir / "finetuned_lora", mdir / "debiased"
    stereo, crows = data / "stereoset" / "dev.json", data / "crows_pairs" / "data" / "crows_pairs_anonymized.csv"
    wino = data / "winogender" / "data"
    pair_flags = flags("10_preprocess_winogender.py")  # e.g. the group-first pairs PCGU's configuration reads
    pairs = data / "processed" / pair_flags.get("out_name", "pairs.tsv")
    stages = [Stage("10 WinoGender pairs", "10_preprocess_winogender.py",
                    {"winogender_dir": wino, "out_dir": data / "processed", **pair_flags},
                    [wino / "all_sentences.tsv", wino / "occupations-stats.tsv"],
                    [data / "processed"], "pcgu")]

    def stereoset(label: str, model: str, inputs: list[Path], before: str | None) -> Stage:
        run = out / "stereoset" / f"{name}-{label}"
        compare = out / "stereoset" / f"{name}-{before}" if before else None
        return Stage(f"13 StereoSet {label}", "13_evaluate_stereoset.py",
                     {"model": model, "data": stereo, "half": "heldout", "out": run,
                      "compare_to": compare, **flags("13_evaluate_stereoset.py"), **common},
                     [stereo, *inputs, *([compare / "items.jsonl"] if compare else [])], [run], "pcgu")

    def crows_pairs(label: str, model: str, inputs: list[Path], before: str | None) -> Stage:
        run = out / "crows" / f"{name}-{label}"
        compare = out / "crows" / f"{name}-{before}" if before else None
        return Stage(f"15 CrowS-Pairs {label}", "15_evaluate_crows.py",
                     {"model": model, "data": crows, "out": run, "compare_to": compare,
                      **flags("15_evaluate_crows.py"), **common},
                     [crows, *inputs, *([compare / "items.jsonl"] if compare else [])], [run], "pcgu")

    stages += [stereoset("base", spec, base_in, None), crows_pairs("base", spec, base_in, None)]
    stages.append(Stage("11 LoRA fine-tuning", "11_finetune_lora.py",
                        {"model": spec, "sentences": wino / "all_sentences.tsv", "out": finetuned,
                         **flags("11_finetune_lora.py"), **common},
                        [wino / "all_sentences.tsv", *base_in], [finetuned, beside(finetuned, "log")], "pcgu"))
    stages += [stereoset("finetuned", str(finetuned), [finetuned], "base"),
               crows_pairs("finetuned", str(finetuned), [finetuned], "base")]
    stages.append(Stage("12 PCGU unlearning", "12_pcgu_unlearn.py",
                        {"model": finetuned, "pairs": pairs, "stereoset": stereo, "out": debiased,
                         "log_dir": out / "pcgu" / name, **flags("12_pcgu_unlearn.py"), **common},
                        [finetuned, pairs, stereo], [debiased, out / "pcgu" / name], "pcgu"))
    stages += [stereoset("debiased", str(debiased), [debiased], "finetuned"),
               crows_pairs("debiased", str(debiased), [debiased], "finetuned")]
    stages.append(Stage("14 prompt completions", "14_compare_prompts.py",
                        {"models": [f"base={spec}", f"finetuned={finetuned}", f"debiased={debiased}"],
                         "out": out / "prompts" / name, **flags("14_compare_prompts.py"), **common},
                        [*base_in, finetuned, debiased], [out / "prompts" / name], "pcgu"))
    return stages


def _bbq_stages(spec: str, flags: Callable[[str], dict], layout: Layout, common: dict) -> list[Stage]:
    name, out = model_name(spec), layout.outputs
    base_in = model_inputs(spec, layout)
    bbq_dir = layout.data / "bbq"
    bbq_files = dataset_inputs("bbq", layout)
    localization = out / "localization"
    return [
        Stage("20 BBQ before", "20_evaluate_bbq.py",
              {"model": spec, "data_dir": bbq_dir, "out": out / "bbq" / name, **flags("20_evaluate_bbq.py"), **common},
              [*bbq_files, *base_in], [out / "bbq" / name], "bbq"),
        Stage("21 localization before", "21_localize_bias.py",
              {"model": spec, "data_dir": bbq_dir, "stage": "before", "name": name, "out_root": localization,
               **flags("21_localize_bias.py"), **common},
              [*bbq_files, *base_in], [localization / name / "before"], "bbq"),
        Stage("22 head pruning + recovery", "22_mitigate_heads.py",
              {"model": spec, "data_dir": bbq_dir, "localization_root": localization, "models_dir": layout.models,
               "out": out / "mitigation" / name, **flags("22_mitigate_heads.py"), **common},
              [*bbq_files, *base_in, localization / name / "before"],
              [out / "mitigation" / name, layout.models / "pruned" / name, layout.models / "recovered" / name,
               localization / name / "after"],
              "bbq"),
    ]

