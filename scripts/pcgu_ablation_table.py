"""Markdown table of PCGU ablation runs (``outputs/pcgu_ablation/<config>-s<seed>/summary.json``).

    python scripts/pcgu_ablation_table.py [--root outputs/pcgu_ablation] [--out outputs/pcgu_ablation/table.md]

One row per run (with ``<run>/extra/summary.json``, an ``--eval-only`` report, filling in overall and CrowS): selection-half gender SS of the kept point, held-out gender SS [95% CI] (every held-out gender
example), McNemar p on them, overall SS and LMS on the held-out sample, perplexity change on the neutral texts,
CrowS-Pairs gender, greedy completion male/female words, training pairs' advantaged-preferred share, steps and
wall time with the fp32 matmul rate measured in the same run. Configurations with several seeds also get a
mean and spread row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from fairforget.artifacts import read_json, write_text
from fairforget.config import run_script
from fairforget.errors import FairforgetError

HEADER = ("| run | sel. gender SS | held-out gender SS [95% CI] | McNemar p | overall SS | LMS | ppl change % [CI] | "
          "CrowS gender | completions m/f | adv-preferred | steps | wall s (GFLOP/s) |")


@dataclass
class Config:
    root: Path = Path("outputs/pcgu_ablation")
    out: Path | None = None

    def validate(self) -> None:
        if not self.root.is_dir():
            raise FairforgetError(f"--root {self.root} is not a folder")


def _ci(value: float, ci: list[float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _words(counts: dict | None) -> str:
    return f"{counts['male_words']}/{counts['female_words']}" if counts else "-"


def _overall(overall: dict | None, when: str) -> str:
    """Overall SS and LMS cells (with the LMS interval), or dashes for a gender-only run."""
    if not overall:
        return "- | -"
    m = overall[when]
    return f"{m['ss']:.2f} | {_ci(m['lms'], m['lms_ci'])}"


def _crows(metrics: dict | None) -> str:
    return _ci(metrics["metric"], metrics["metric_ci"]) if metrics else "-"


def row(name: str, s: dict, g: dict | None) -> str:
    h = s["heldout"]
    kept = next(e for e in s["epochs"] if e["step"] == s["kept_step"])
    gender, overall, ppl = h["gender"], h.get("overall"), h["perplexity"]
    crows = h.get("crows_gender", {}).get("after")
    comp = h.get("completions", {}).get("after")
    wall = f"{g['wall_seconds']} ({g['gflops_before']}/{g['gflops_after']})" if g else "?"
    return (f"| {name} | {kept['ss_gender']:.2f} | {_ci(gender['after']['ss'], gender['after']['ss_ci'])} | "
            f"{gender['paired']['p_value']:.2g} | {_overall(overall, 'after')} | "
            f"{ppl['ppl_change_pct']:+.2f} [{ppl['ppl_change_pct_ci'][0]:+.2f}, {ppl['ppl_change_pct_ci'][1]:+.2f}] | "
            f"{_crows(crows)} | {_words(comp)} | {100 * kept['share_adv_preferred']:.1f}% | {kept['step']} | {wall} |")


def start_row(s: dict) -> str:
    h = s["heldout"]
    gender = h["gender"]["before"]
    crows = h.get("crows_gender", {}).get("before")
    comp = h.get("completions", {}).get("before")
    first = s["epochs"][0]
    return (f"| start model | {first['ss_gender']:.2f} | {_ci(gender['ss'], gender['ss_ci'])} | - | "
            f"{_overall(h.get('overall'), 'before')} | ppl {h['perplexity']['before']:.2f} | "
            f"{_crows(crows)} | {_words(comp)} | {100 * first['share_adv_preferred']:.1f}% | 0 | - |")


def with_extra(run: Path) -> dict:
    """A run's summary, with the overall sample and CrowS gender of ``<run>/extra`` (an ``--eval-only`` report
    of the kept model) where the run's own report lacks them."""
    summary = read_json(run / "summary.json")
    if (run / "extra" / "summary.json").is_file():
        extra = read_json(run / "extra" / "summary.json")["heldout"]
        for key in ("overall", "crows_gender"):
            if key in extra and key not in summary["heldout"]:
                summary["heldout"][key] = extra[key]
    return summary


def main(cfg: Config) -> None:
    runs = sorted(p.parent for p in cfg.root.glob("*/summary.json"))
    runs = [r for r in runs if "heldout" in read_json(r / "summary.json")]
    if not runs:
        raise FairforgetError(f"no finished runs with a held-out report under {cfg.root}")
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    by_config: dict[str, list[float]] = {}
    summaries = {r.name: with_extra(r) for r in runs}
    lines.append(start_row(max(summaries.values(), key=lambda s: len(s["heldout"]))))
    for name, s in summaries.items():
        g = read_json(cfg.root / name / "gflops.json") if (cfg.root / name / "gflops.json").is_file() else None
        lines.append(row(name, s, g))
        by_config.setdefault(name.rsplit("-s", 1)[0], []).append(s["heldout"]["gender"]["after"]["ss"])
    for config, values in by_config.items():
        if len(values) > 1:
            lines.append(f"| **{config}, {len(values)} seeds** | | mean {statistics.mean(values):.2f}, sd "
                         f"{statistics.stdev(values):.2f} (min {min(values):.2f}, max {max(values):.2f}) | | | | | | | | | |")
    text = "\n".join(lines) + "\n"
    write_text(cfg.out or cfg.root / "table.md", text)
    print(text)


if __name__ == "__main__":
    run_script(main, Config())
