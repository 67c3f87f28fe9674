"""Markdown table of PCGU ablation runs (``outputs/pcgu_ablation/<config>-s<seed>/summary.json``).

    python scripts/pcgu_ablation_table.py [--root outputs/pcgu_ablation] [--out outputs/pcgu_ablation/table.md]

One row per run (selection-half gender SS and LMS at the kept point: what the choice saw; with ``<run>/extra/summary.json``, an ``--eval-only`` report, filling in overall and CrowS): selection-half gender SS of the kept point, held-out gender SS [95% CI] (every held-out gender
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

HEADER = ("| run | sel. gender SS | sel. LMS | held-out gender SS [95% CI] | McNemar p | overall SS | LMS | ppl change % [CI] | "
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


def _pct(value: float) -> str:
    """A perplexity change in percent; past +1,000% as the factor (x1.2e+05), which is what it is."""
    return f"{value:+.2f}" if abs(value) < 1000 else f"x{1 + value / 100:.2g}"


def _crows(metrics: dict | None) -> str:
    return _ci(metrics["metric"], metrics["metric_ci"]) if metrics else "-"


def row(name: str, s: dict, g: dict | None) -> str:
    h = s["heldout"]
    kept = next(e for e in s["epochs"] if e["step"] == s["kept_step"])
    gender, overall, ppl = h["gender"], h.get("overall"), h["perplexity"]
    crows = h.get("crows_gender", {}).get("after")
    comp = h.get("completions", {}).get("after")
    wall = f"{g['wall_seconds']} ({g['gflops_before']}/{g['gflops_after']})" if g else "?"
    return (f"| {name} | {kept['ss_gender']:.2f} | {kept['lms']:.2f} | {_ci(gender['after']['ss'], gender['after']['ss_ci'])} | "
            f"{gender['paired']['p_value']:.2g} | {_overall(overall, 'after')} | "
            f"{_pct(ppl['ppl_change_pct'])} [{_pct(ppl['ppl_change_pct_ci'][0])}, {_pct(ppl['ppl_change_pct_ci'][1])}] | "
            f"{_crows(crows)} | {_words(comp)} | {100 * kept['share_adv_preferred']:.1f}% | {kept['step']} | {wall} |")


def start_row(s: dict) -> str:
    h = s["heldout"]
    gender = h["gender"]["before"]
    crows = h.get("crows_gender", {}).get("before")
    comp = h.get("completions", {}).get("before")
    first = s["epochs"][0]
    return (f"| start model | {first['ss_gender']:.2f} | {first['lms']:.2f} | {_ci(gender['ss'], gender['ss_ci'])} | - | "
            f"{_overall(h.get('overall'), 'before')} | ppl {h['perplexity']['before']:.2f} | "
            f"{_crows(crows)} | {_words(comp)} | {100 * first['share_adv_preferred']:.1f}% | 0 | - |")


def _spread(values: list[float], signed: bool = False) -> str:
    fmt = "+.2f" if signed else ".2f"
    return (f"mean {statistics.mean(values):{fmt}}, sd {statistics.stdev(values):.2f} "
            f"(min {min(values):{fmt}}, max {max(values):{fmt}})")


def seeds_row(config: str, reports: list[dict]) -> str:
    """Mean and spread across seeds of held-out gender SS, overall LMS and the perplexity change; the largest
    McNemar p."""
    gender = _spread([r["gender"]["after"]["ss"] for r in reports])
    p_max = max(r["gender"]["paired"]["p_value"] for r in reports)
    lms = [r["overall"]["after"]["lms"] for r in reports if r.get("overall")]
    ppl = _spread([r["perplexity"]["ppl_change_pct"] for r in reports], signed=True)
    return (f"| **{config}, {len(reports)} seeds** | | | {gender} | max {p_max:.2g} | | "
            f"{_spread(lms) if len(lms) > 1 else '-'} | {ppl} | | | | | |")


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
    by_config: dict[str, list[dict]] = {}
    summaries = {r.name: with_extra(r) for r in runs}
    lines.append(start_row(max(summaries.values(), key=lambda s: len(s["heldout"]))))
    for name, s in summaries.items():
        g = read_json(cfg.root / name / "gflops.json") if (cfg.root / name / "gflops.json").is_file() else None
        lines.append(row(name, s, g))
        by_config.setdefault(name.rsplit("-s", 1)[0], []).append(s["heldout"])
    for config, reports in by_config.items():
        if len(reports) > 1:
            lines.append(seeds_row(config, reports))
    text = "\n".join(lines) + "\n"
    write_text(cfg.out or cfg.root / "table.md", text)
    print(text)


if __name__ == "__main__":
    run_script(main, Config())
