"""Script constants as a dataclass, every field overridable from the command line (the nanoGPT habit).

A script declares ``@dataclass class Config`` at its top and calls :func:`run_script`. Each field
``foo_bar`` becomes ``--foo-bar``; booleans get ``--foo/--no-foo``; ``Literal`` fields get choices;
list fields take several values. ``--config FILE.json`` loads overrides from a JSON file first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin

from fairforget.artifacts import WHOLE_FOLDER_KINDS, claim_folder, output_folder
from fairforget.datasets import check_data_inputs
from fairforget.errors import FairforgetError

C = TypeVar("C")
MIN_BOOT = 10  # bootstrap replicates below which --n-boot is refused: fewer give no 95% interval at all


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = get_args(tp)
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _converter(tp: Any, optional: bool) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if tp is Path:
            return Path(text)
        return tp(text)

    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def build_parser(default: Any, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass instance ``default``."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=None, help="JSON file of overrides (applied before flags)")
    for field in dataclasses.fields(default):
        flag = "--" + field.name.replace("_", "-")
        tp, optional = _unwrap_optional(_field_type(type(default), field))
        value = getattr(default, field.name)
        help_text = field.metadata.get("help", "") + f" (default: {value!r})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(tp) is Literal:
            parser.add_argument(flag, choices=list(get_args(tp)), **kwargs)
        elif get_origin(tp) in (list, tuple):
            inner = get_args(tp)[0]
            if get_origin(inner) is Literal:
                parser.add_argument(flag, nargs="*", choices=list(get_args(inner)), **kwargs)
            else:
                parser.add_argument(flag, nargs="*", type=_converter(inner, False), **kwargs)
        else:
            parser.add_argument(flag, type=_converter(tp, optional), **kwargs)
    return parser


def parse_config(default: C, argv: list[str] | None = None, description: str | None = None) -> C:
    """Return a copy of ``default`` with overrides from ``--config`` and command-line flags, checked: the shared
    checks (:func:`check_common`), the output folders (:func:`check_outputs`), then ``validate()``."""
    parser = build_parser(default, description)
    args = vars(parser.parse_args(argv))
    overrides: dict[str, Any] = {}
    config_file = args.pop("config")
    if config_file is not None:
        overrides.update(_load_overrides(config_file, default))
    overrides.update(args)
    cfg = dataclasses.replace(default, **overrides)
    check_common(cfg)
    check_outputs(cfg)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def check_common(cfg: Any) -> None:
    """The checks every stage's flags share, by field: a number must be finite (``--lr inf`` is not a rate),
    ``--seed`` and a ``--max-*`` budget at least 0, ``--n-boot`` at least :data:`MIN_BOOT`, a ``*dropout``
    probability in [0, 1), a selection sample (``--selection-limit``, ``--selection-ppl-texts``) at least 1."""
    for field in dataclasses.fields(cfg):
        flag, value = "--" + field.name.replace("_", "-"), getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise FairforgetError(f"{flag} must be a finite number, got {value}")
        if (field.name == "seed" or field.name.startswith("max_")) and _number(value) and value < 0:
            raise FairforgetError(f"{flag} must be at least 0, got {value}")
        if field.name == "n_boot" and isinstance(value, int) and value < MIN_BOOT:
            raise FairforgetError(f"{flag} must be at least {MIN_BOOT} (a 95% interval needs bootstrap replicates "
                                  f"beyond its 2.5% tails; 1000 is the default), got {value}")
        if field.name.endswith("dropout") and isinstance(value, (int, float)) and not 0 <= value < 1:
            raise FairforgetError(f"{flag} is a probability of dropping a unit: it must be in [0, 1), got {value}")
        if field.name in ("selection_limit", "selection_ppl_texts") and _number(value) and value < 1:
            raise FairforgetError(f"{flag} is a sample size: it must be at least 1, got {value}")


def _number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (a bool is neither)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _load_overrides(path: Path, default: Any) -> dict[str, Any]:
    """The JSON object in ``path``, each value checked against (and converted to) its field's type."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise FairforgetError(f"config file not found: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FairforgetError(f"config file {path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise FairforgetError(f"config file {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise FairforgetError(f"config file {path} must hold a JSON object of settings "
                              f"({{\"key\": value, ...}}), not {_json_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(default)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FairforgetError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    return {key: _checked(value, _field_type(type(default), fields[key]), f"config file {path}: {key!r}")
            for key, value in data.items()}


def _checked(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from JSON) as type ``tp``: bool is not an int, a float is not an int, a string is not a list."""
    tp, optional = _unwrap_optional(tp)
    expected = _describe(tp) + (" or null" if optional else "")
    bad = FairforgetError(f"{where} must be {expected}, got {json.dumps(value)}")
    if value is None:
        if optional:
            return None
        raise bad
    origin = get_origin(tp)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp in (str, Path):
        ok = isinstance(value, str)
        value = Path(value) if ok and tp is Path else value
    elif origin is Literal:
        ok = any(value == choice and type(value) is type(choice) for choice in get_args(tp))
    elif origin in (list, tuple):
        if not isinstance(value, list):
            raise bad
        inner = (get_args(tp) or (Any,))[0]
        return [_checked(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        inner = (get_args(tp) or (Any, Any))[1]
        return {k: _checked(v, inner, f"{where}[{k!r}]") for k, v in value.items()}
    else:  # Any, or a type this check does not know: taken as it is
        ok = True
    if not ok:
        raise bad
    return value


def _describe(tp: Any) -> str:
    """How a type reads in an error message."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(c) for c in get_args(tp))
    if origin in (list, tuple):
        inner = (get_args(tp) or (Any,))[0]
        return f"a list (each item {_describe(inner)})"
    if tp is dict or origin is dict:
        return "an object"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def path_fields(cfg: Any) -> dict[str, Path]:
    """``{flag: path}`` of every path-valued field of a config (lists of paths included)."""
    found = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for k, item in enumerate(v for v in values if isinstance(v, Path)):
            found["--" + field.name.replace("_", "-") + (f" [{k}]" if k else "")] = item
    return found


def output_field(default: Path | None, kind: str, help_text: str = "") -> Any:
    """A Config field naming an output folder holding a result of ``kind``: :func:`run_script` checks it before
    the stage starts (a folder of other files, a file, the checkout itself are refused; see
    :func:`fairforget.artifacts.output_folder`)."""
    return dataclasses.field(default=default, metadata={"help": help_text, "writes": kind} if help_text
                             else {"writes": kind})


def check_outputs(cfg: Any, claim: bool = False) -> None:
    """Check every output folder flag of ``cfg`` (its :func:`output_field` fields) before the stage starts;
    with ``claim``, create each folder a stage adds its files to (not one replaced whole) with its marker."""
    for field in dataclasses.fields(cfg):
        kind, value = field.metadata.get("writes"), getattr(cfg, field.name)
        if kind is not None and value is not None:
            flag = "--" + field.name.replace("_", "-")
            if claim and kind not in WHOLE_FOLDER_KINDS:
                claim_folder(value, kind, flag)
            else:
                output_folder(value, kind, flag)


def run_script(main: Callable[[C], Any], default: C, argv: list[str] | None = None, verify_data: bool = True) -> None:
    """Parse flags into ``default``'s type, verify the pinned data files its paths point at (unless
    ``verify_data`` is False: the fetch stage, which repairs them), claim its output folders, run ``main(cfg)``; a FairforgetError exits 2
    with one line."""
    try:
        cfg = parse_config(default, argv, description=(sys.modules[main.__module__].__doc__ or None))
        if verify_data:
            check_data_inputs(path_fields(cfg))
        check_outputs(cfg, claim=True)
        main(cfg)
    except FairforgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def typed_config(config_class: type, script_cfg: Any) -> Any:
    """The package's typed config built from a stage script's Config (the fields they share by name)."""
    names = [f.name for f in dataclasses.fields(config_class)]
    return config_class(**{n: getattr(script_cfg, n) for n in names if hasattr(script_cfg, n)})
