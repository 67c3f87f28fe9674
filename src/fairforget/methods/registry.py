"""The method registry: every debiasing method by name, as peft's ``register_peft_method`` lists its tuners.

A method registers one :class:`MethodSpec`: its stage script (how it runs), its typed config (a dataclass the
package owns, saved next to what the method produces as ``method_config.json``, as peft saves
``adapter_config.json``), the data files it reads, its output kind (a ``model`` folder every loader opens, or a
scoring ``wrapper`` with a loader of its own), its strength knobs (each with the value at which the method
returns the start model) and its methods-preset sizes. The methods plan, stage 30 and :func:`load_output` (the
one loader of every evaluation stage) read from here; nothing else lists method names.

Adding a method: a module (its algorithm, its config dataclass and one ``register_method`` call), a stage script
(``Config`` -> ``main``: build the typed config with :func:`typed_config`, run, save, write the record), and its
import in ``fairforget/methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from fairforget.artifacts import read_json, write_json
from fairforget.provenance import provenance
from fairforget.config import config_to_dict, typed_config
from fairforget.errors import FairforgetError
from fairforget.layout import Layout
from fairforget.models import LoadedModel, load_model

CONFIG_FILE = "method_config.json"
OutputKind = Literal["model", "wrapper"]


@dataclass(frozen=True)
class Knob:
    """A setting that trades bias against capability (a stage script flag)."""

    name: str
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the plan, the comparison and the loaders need to know about one method."""

    name: str
    title: str  # the method and its paper, for tables and the report
    script: str  # scripts/<script>: Config -> main (the method's run)
    config: type  # the typed config (a dataclass) saved next to the output as method_config.json
    knobs: tuple[Knob, ...]
    zero_flags: dict  # stage flags at which the method returns the start model exactly
    inputs: Callable[[Layout], list[Path]]  # data files the stage reads
    data_flags: Callable[[Layout], dict]  # the stage script's data flags under a layout
    sizes: dict = field(default_factory=dict)  # the methods preset's flags (training epochs, selection sizes)
    output: OutputKind = "model"
    load: Callable[[Path, dict, str], LoadedModel] | None = None  # wrapper outputs: (folder, config, device)
    # a stage that does not write its output to --out and its record to --log-dir: its output flags, and
    # where its final output then lies, (models root of the method, the stage's flags) -> folder
    output_flags: Callable[["MethodSpec", Layout], dict] | None = None
    output_folder: Callable[[Path, dict], Path] | None = None
    group: str = "methods"  # the preset's folder group: models/<group>/<name>, outputs/<group>/<name>
    saves_settings: bool = False  # its stage takes --settings-dir: every setting's model, a frontier for stage 30

    def in_group(self, group: str) -> "MethodSpec":
        """The same method writing under ``models/<group>/`` and ``outputs/<group>/`` (the controls preset runs
        every method again, on the planted model, beside the methods preset's folders)."""
        return dataclasses.replace(self, group=group)

    def root(self, layout: Layout) -> Path:
        return layout.models / self.group / self.name

    def folder(self, layout: Layout, flags: dict) -> Path:
        """The folder the method's final output lands in under ``layout``, run with the stage ``flags``."""
        return self.output_folder(self.root(layout), flags) if self.output_folder else self.root(layout)

    def settings_dir(self, layout: Layout) -> Path:
        """Where its stage saves every setting's model (``--settings-dir``) when a plan asks for a frontier."""
        return layout.models / self.group / f"{self.name}_settings"

    def log_dir(self, layout: Layout) -> Path:
        """Where the method's record (method.json) and logs go."""
        return layout.outputs / self.group / self.name

    def flags(self, model: str, layout: Layout, **overrides: Any) -> dict:
        """The stage script's flags: the start model, the data and output folders, the preset sizes, overrides."""
        outputs = (self.output_flags(self, layout) if self.output_flags
                   else {"out": self.root(layout), "log_dir": self.log_dir(layout)})
        return {"model": model, **self.data_flags(layout), **outputs, **self.sizes, **overrides}


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (a name registers once; a wrapper needs a loader)."""
    if spec.name in METHODS or spec.name == "before":
        raise FairforgetError(f"method {spec.name!r} is already registered (or reserved)")
    if spec.output == "wrapper" and spec.load is None:
        raise FairforgetError(f"method {spec.name!r}: a wrapper output needs a load function")
    if not dataclasses.is_dataclass(spec.config):
        raise FairforgetError(f"method {spec.name!r}: its config must be a dataclass")
    METHODS[spec.name] = spec
    return spec


def method(name: str) -> MethodSpec:
    """The registered method called ``name``."""
    if name not in METHODS:
        raise FairforgetError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, config: Any, **details: Any) -> dict:
    """What ``method_config.json`` holds: which method made the folder, its output kind and its typed config."""
    return {"method": name, "output": method(name).output, "config": config_to_dict(config),
            **details}


def save_method_config(folder: Path | str, name: str, config: Any, **details: Any) -> None:
    """``<folder>/method_config.json`` beside an output saved without it (adapters, the Self-Debias folder)."""
    write_json(Path(folder) / CONFIG_FILE, method_config(name, config, **details))


def read_method_config(folder: Path | str) -> dict | None:
    """The method_config.json of ``folder`` (None when the folder has none, e.g. a plain model)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    record = read_json(path, "method config")
    if not isinstance(record, dict) or not {"method", "output", "config"} <= set(record):
        raise FairforgetError(f"{path}: not a method config (needs method, output and config)")
    return record


def load_output(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Any model or method output: a wrapper folder through its method's loader, everything else through
    :func:`fairforget.models.load_model` (hub id, model or adapter folder, embedded model)."""
    record = read_method_config(spec) if Path(spec).is_dir() else None
    if record is None or record["output"] == "model":
        return load_model(spec, device, dtype)
    return method(record["method"]).load(Path(spec), record["config"], device)


def output_kind(spec: str) -> OutputKind:
    """``wrapper`` for a scoring-wrapper folder (its scorers keep several distributions: smaller batches),
    else ``model``."""
    record = read_method_config(spec) if Path(spec).is_dir() else None
    return record["output"] if record else "model"


def stage_name(spec: MethodSpec) -> str:
    """The plan's label of a method's stage, e.g. ``32 task_vector``."""
    return f"{spec.script[:2]} {spec.name}"


def default_folders(model: str, layout: Layout = Layout()) -> dict[str, Path]:
    """Every registered method's final output folder under ``layout``, run by the methods preset on ``model``."""
    return {name: spec.folder(layout, spec.flags(model, layout)) for name, spec in METHODS.items()}


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB (the whole method run: model, data, training)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def write_method_record(log_dir: Path, name: str, cfg: Any, seconds: float, data_files: list, **details: Any) -> dict:
    """``<log_dir>/method.json``: the run's wall time, peak memory, details and provenance, and for a registered
    method its typed config (stage 16's planting records the same way, without one)."""
    typed = {"config": config_to_dict(typed_config(METHODS[name].config, cfg))} if name in METHODS else {}
    record = {"method": name, "wall_seconds": round(seconds, 1), "peak_memory_mib": peak_memory_mib(), **typed,
              **details, "provenance": provenance(cfg, data_files)}
    write_json(Path(log_dir) / "method.json", record)
    return record
