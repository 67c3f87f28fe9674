"""Config flags, atomic artifacts, provenance and model loading errors."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from fairforget.artifacts import atomic_dir, read_jsonl, write_json
from fairforget.provenance import provenance
from fairforget.config import parse_config
from fairforget.errors import FairforgetError
from fairforget.models import load_model, prepare_embedded


@dataclass
class Demo:
    model: str = "m"
    batch_size: int = 8
    lr: float = 1e-5
    use_lora: bool = True
    mode: Literal["letter", "answer"] = "letter"
    categories: list[str] = field(default_factory=lambda: ["Age"])
    limit: int | None = None
    out: Path = Path("outputs/x")

    def validate(self):
        if self.batch_size < 1:
            raise FairforgetError("--batch-size must be at least 1")


def test_every_field_is_a_flag():
    cfg = parse_config(Demo(), ["--batch-size", "4", "--lr", "2e-5", "--no-use-lora", "--mode", "answer",
                                "--categories", "Age", "SES", "--limit", "7", "--out", "o"])
    assert cfg == Demo(batch_size=4, lr=2e-5, use_lora=False, mode="answer", categories=["Age", "SES"], limit=7,
                       out=Path("o"))
    assert parse_config(Demo(), []) == Demo()
    assert parse_config(Demo(), ["--limit", "none"]).limit is None


def test_bad_flags_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        parse_config(Demo(), ["--mode", "bogus"])
    with pytest.raises(SystemExit):
        parse_config(Demo(), ["--batch-size", "four"])
    with pytest.raises(FairforgetError, match="batch-size"):
        parse_config(Demo(), ["--batch-size", "0"])
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"batch_size": 2, "nope": 1}))
    with pytest.raises(FairforgetError, match="nope"):
        parse_config(Demo(), ["--config", str(config_file)])
    config_file.write_text(json.dumps({"batch_size": 2}))
    assert parse_config(Demo(), ["--config", str(config_file), "--lr", "0.5"]) == Demo(batch_size=2, lr=0.5)


@pytest.mark.parametrize("content, message", [
    ({"batch_size": True}, "'batch_size' must be an integer, got true"),  # bool is not an int
    ({"batch_size": 2.5}, "'batch_size' must be an integer, got 2.5"),  # nor is a float
    ({"limit": "seven"}, "'limit' must be an integer or null, got \"seven\""),
    ({"use_lora": 1}, "'use_lora' must be true or false, got 1"),
    ({"lr": "fast"}, "'lr' must be a number, got \"fast\""),
    ({"categories": "Age"}, "'categories' must be a list (each item a string), got \"Age\""),  # not ['A','g','e']
    ({"categories": ["Age", 3]}, "'categories'[1] must be a string, got 3"),
    ({"mode": "word"}, "'mode' must be one of \"letter\", \"answer\", got \"word\""),
    ({"out": 5}, "'out' must be a path (a string), got 5"),
    ([{"batch_size": 2}], "must hold a JSON object of settings"),
    ("batch_size=2", "must hold a JSON object of settings"),
])
def test_config_file_values_must_have_their_field_types(tmp_path, content, message):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps(content))
    with pytest.raises(FairforgetError) as error:
        parse_config(Demo(), ["--config", str(config_file)])
    assert message in str(error.value) and str(config_file) in str(error.value)


def test_config_file_values_are_converted_to_their_field_types(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"lr": 1, "limit": None, "out": "o", "categories": [], "use_lora": False}))
    cfg = parse_config(Demo(), ["--config", str(config_file)])
    assert cfg == Demo(lr=1.0, limit=None, out=Path("o"), categories=[], use_lora=False)
    assert type(cfg.lr) is float and isinstance(cfg.out, Path)


def test_atomic_writes_keep_the_old_result_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"ss": 50})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ss": 50}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    folder = tmp_path / "model"
    with atomic_dir(folder, "model") as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder, "model") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (folder / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(FairforgetError, match=r"items.jsonl line 2"):
        read_jsonl(path)


def test_provenance_records_config_versions_and_hashes(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("abc")
    block = provenance(Demo(), [data], prompt_template="Q: {q}")
    assert block["config"]["batch_size"] == 8
    assert block["data_sha256"][str(data)] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert block["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert block["prompt_template"] == "Q: {q}"


def test_unknown_models_fail_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FairforgetError, match="embedded:smollm2-135m-instruct"):
        load_model("someone/not-cached-model", "cpu")
    with pytest.raises(FairforgetError, match="not found"):
        load_model(str(tmp_path / "missing"), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FairforgetError, match="config.json"):
        load_model(str(tmp_path / "empty"), "cpu")
    with pytest.raises(FairforgetError, match="unknown embedded model"):
        prepare_embedded("embedded:gpt-5")
    with pytest.raises(FairforgetError, match="CUDA"):
        load_model("embedded:smollm2-135m-instruct", "cuda" if not torch.cuda.is_available() else "tpu")


def test_saved_tiny_model_loads_with_same_outputs(tmp_path, tiny_models, tokenizer):
    from fairforget.tiny import save_tiny_model

    for arch in ("llama", "gpt2"):
        folder = save_tiny_model(arch, tokenizer, tmp_path / arch)
        loaded = load_model(str(folder), "cpu")
        ids = torch.tensor([tokenizer("The nurse said")["input_ids"]])
        with torch.no_grad():
            assert torch.allclose(loaded.model(ids).logits, tiny_models[arch](ids).logits, atol=1e-5)
