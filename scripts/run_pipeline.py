"""Run the whole study: data, model, pipeline 1 (PCGU) and pipeline 2 (BBQ heads), then outputs/report.md.

    python scripts/run_pipeline.py --preset quick --data-source ../shared/data     # CPU, about 15 minutes
    python scripts/run_pipeline.py --preset full                                   # every example, GPU
    python scripts/run_pipeline.py --preset quick --pipelines bbq --force           # one pipeline, redone
    python scripts/run_pipeline.py --preset full --nproc 4                          # 4 GPUs (torchrun)
    python scripts/run_pipeline.py --preset quick --findings-only                   # print the headline block
    python scripts/run_pipeline.py --preset controls    # plant a gender bias, every method on it, shares removed

Each stage runs as its own subprocess, exactly the command printed (``scripts/NN_*.py --flags``), from the
current folder (paths are relative to it, as the scripts' defaults). A stage whose outputs exist with a
matching ``.stage.json`` (same script, arguments and input sha256) is skipped; ``--force`` redoes all.
``quick``: the embedded SmolLM2-135M-Instruct for both pipelines and small samples (StereoSet 300 examples of
the held-out half, CrowS-Pairs 200 pairs, BBQ 8 per category, 1 LoRA epoch on 240 sentences, PCGU in the
configuration the ablation chose, configs/pcgu/gf_after_dyn_bal_lr1e-3.json). ``full``: state-spaces/mamba-130m-hf (pipeline 1) and meta-llama/Llama-3.2-1B-Instruct (pipeline 2),
every example. With ``--nproc N`` the evaluations and the LoRA fine-tuning run in N processes under torchrun
(same results). A preset is a file, ``configs/<name>.json``: the models and each stage's flags; copy one,
edit it and pass ``--preset my_preset.json``. The run stops at the first failing stage, with its error, and
still writes the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import run_script
from fairforget.errors import FairforgetError
from fairforget.matmul import matmul_rates, rates_text
from fairforget.study.findings import collect_changes, collect_shares, findings_block
from fairforget.study.pipeline import PIPELINES, Layout, build_plan, run_stages
from fairforget.study.report import build_report

Pipeline = Literal[PIPELINES]  # type: ignore[valid-type]


@dataclass
class Config:
    preset: str = field(default="quick", metadata={"help": "quick, full, methods, controls (configs/<name>.json) "
                                                           "or a preset file of your own (copy one of configs/ and edit it)"})
    pipelines: list[Pipeline] = field(default_factory=lambda: list(PIPELINES),
                                      metadata={"help": "which pipelines to run: pcgu, bbq or both"})
    data_source: Path | None = field(default=None, metadata={"help": "copy the datasets from this folder (data/ "
                                                                     "layout, sha256-checked) instead of downloading"})
    pcgu_model: str | None = field(default=None, metadata={"help": "override the preset's pipeline-1 model"})
    bbq_model: str | None = field(default=None, metadata={"help": "override the preset's pipeline-2 model"})
    force: bool = field(default=False, metadata={"help": "run every stage even when its outputs are up to date"})
    nproc: int = field(default=1, metadata={"help": "processes per evaluation / fine-tuning stage (torchrun)"})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    report: Path = Path("outputs/report.md")
    findings_only: bool = field(default=False, metadata={"help": "run nothing: print the report's 'What this run "
                                                                 "found' block from the outputs already there "
                                                                 "(the README opens with it)"})

    def validate(self) -> None:
        if not self.pipelines:
            raise FairforgetError("--pipelines needs at least one of: " + " ".join(PIPELINES))
        if self.nproc < 1:
            raise FairforgetError(f"--nproc must be at least 1, got {self.nproc}")
        if self.data_source is not None and not self.data_source.is_dir():
            raise FairforgetError(f"--data-source {self.data_source} is not a folder")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    layout = Layout()
    stages = build_plan(cfg.preset, cfg.pipelines, cfg.data_source.resolve() if cfg.data_source else None,
                        cfg.device, cfg.seed, layout, cfg.pcgu_model, cfg.bbq_model)
    if cfg.findings_only:
        print(findings_block(collect_changes(stages), collect_shares(stages)), end="")
        return
    rates_before = matmul_rates()
    print(f"preset {cfg.preset}: {len(stages)} stages ({', '.join(dict.fromkeys(cfg.pipelines))}); fp32 matmul "
          f"{rates_text(rates_before)} before the run", flush=True)
    results = run_stages(stages, force=cfg.force, nproc=cfg.nproc, log=lambda line: print(line, flush=True))
    total = time.perf_counter() - start
    rates_after = matmul_rates()
    machine = f"fp32 2048^3 matmul {rates_text(rates_before)} before the run, {rates_text(rates_after)} after it"
    build_report(stages, results, cfg.report, f"preset {cfg.preset}", total, layout.data, machine)
    ran = [r for r in results if r.status == "ran"]
    print(f"report: {cfg.report}")
    slowest = ", ".join(f"{r.name} {r.seconds:.0f} s" for r in sorted(ran, key=lambda r: -r.seconds)[:3])
    print(f"total wall time {total / 60:.1f} min ({len(ran)} stages run"
          + (f"; slowest: {slowest}" if ran else "") + f"); {machine}")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise FairforgetError(f"stage {failed[0].name} failed: {failed[0].note}")


if __name__ == "__main__":
    run_script(main, Config())
