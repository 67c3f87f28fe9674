"""Flag groups several stage scripts share, as dataclass mixins: a script's ``Config`` inherits the groups it uses
and lists only its own constants (a field declared again in the script gives it another default there).
:func:`fairforget.config.parse_config` makes every field of the whole class a flag, inherited ones included."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field

Device = Literal["auto", "cpu", "cuda"]


@dataclass
class RunFlags:
    """Every stage: the seed of its sampling, shuffling and bootstrap, and where it runs."""

    seed: int = 0
    device: Device = "auto"


@dataclass
class EvaluationFlags(RunFlags):
    """The evaluation stages (13, 15, 17, 20): batching, intervals, progress, dtype, the run folder and the
    earlier run a paired comparison is made against."""

    batch_size: int = 32
    n_boot: int = 1000
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    dtype: str = "auto"
    out: Path | None = output_field(None, "run", "run folder (default outputs/<evaluation>/<model>)")
    compare_to: Path | None = field(default=None, metadata={"help": "earlier run folder for a paired comparison"})


@dataclass
class LoRAFlags(RunFlags):
    """A method's LoRA fine-tune (:func:`fairforget.methods.lora.finetune`)."""

    epochs: int = 3
    batch_size: int = 8
    lr: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16


@dataclass
class SettingsFlags(RunFlags):
    """A stage that can save every setting of its strength knob (:func:`fairforget.methods.selection.save_setting`)."""

    settings_dir: Path | None = field(default=None, metadata={
        "help": "also save every setting's model to <dir>/<knob>_<value>: a frontier for stage 30 --frontiers"})


@dataclass
class SelectionFlags(SettingsFlags):
    """A method's choice of its strength on the StereoSet selection half (:mod:`fairforget.methods.selection`):
    the smallest |SS - 50| of --selection-metric whose LMS is at most --max-lms-drop below the start's and whose
    perplexity on --selection-ppl-texts retain-half neutral texts is at most --max-ppl-increase percent above it
    (the start itself when no setting is in that budget)."""

    stereoset: Path = Path("data/stereoset/dev.json")
    selection_metric: Literal["overall", "gender"] = "gender"
    selection_limit: int | None = field(default=120, metadata={"help": "selection-half sample size (None: all)"})
    max_lms_drop: float | None = field(default=2.0, metadata={"help": "LMS points a setting may lose vs the start"})
    max_ppl_increase: float | None = field(default=5.0, metadata={
        "help": "percent perplexity a setting may add vs the start, on retain-half neutral texts (None: no bound)"})
    selection_ppl_texts: int = field(default=40, metadata={"help": "retain-half neutral texts for that bound"})
    half_seed: int = 0
    eval_batch_size: int = 32
