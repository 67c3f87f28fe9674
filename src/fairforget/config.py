"""Script constants as a dataclass, every field overridable from the command line (the nanoGPT habit).

A script declares ``@dataclass class Config`` at its top and calls :func:`run_script`. Each field
``foo_bar`` becomes ``--foo-bar``; booleans get ``--foo/--no-foo``; ``Literal`` fields get choices;
list fields take several values. ``--config FILE.json`` loads overrides from a JSON file first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin

from .errors import FairforgetError

C = TypeVar("C")


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
    """Return a copy of ``default`` with overrides from ``--config`` and command-line flags."""
    parser = build_parser(default, description)
    args = vars(parser.parse_args(argv))
    overrides: dict[str, Any] = {}
    config_file = args.pop("config")
    if config_file is not None:
        overrides.update(_load_overrides(config_file, default))
    overrides.update(args)
    cfg = dataclasses.replace(default, **overrides)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def _load_overrides(path: Path, default: Any) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise FairforgetError(f"config file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise FairforgetError(f"config file {path} is not valid JSON: {exc}") from exc
    names = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FairforgetError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    return data


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def run_script(main: Callable[[C], Any], default: C, argv: list[str] | None = None) -> None:
    """Parse flags into ``default``'s type, run ``main(cfg)``; a FairforgetError exits 2 with one line."""
    try:
        cfg = parse_config(default, argv, description=(sys.modules[main.__module__].__doc__ or None))
        main(cfg)
    except FairforgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
