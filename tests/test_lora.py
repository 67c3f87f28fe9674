"""LoRA: per-architecture targets exist, a short fine-tune lowers the loss, the saved adapter reloads."""

import copy
import re

import pytest
import torch

from fairforget.errors import FairforgetError
from fairforget.methods.lora import TARGET_MODULES, add_lora, finetune, mean_loss, save_adapter, target_modules
from fairforget.models import load_model
from fairforget.tiny import save_tiny_model

TEXTS = ["The nurse said that she was tired.", "The engineer said that he fixed it.",
         "The doctor told the patient that he would operate.", "The secretary said that she would call."]


@pytest.mark.parametrize("arch", ["llama", "mamba", "gpt2"])
def test_default_targets_exist_and_only_lora_trains(tiny_models, arch):
    model = copy.deepcopy(tiny_models[arch])
    targets = target_modules(model)
    assert targets == TARGET_MODULES[arch]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(targets) <= leaves
    peft_model = add_lora(model, targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {re.search(r"([^.]+)\.lora_", n)[1] for n in trainable}
    assert wrapped == set(targets)


def test_unknown_target_is_an_error(tiny_models):
    with pytest.raises(FairforgetError, match="out_projection"):
        target_modules(tiny_models["llama"], ["q_proj", "out_projection"])


def test_short_finetune_lowers_loss_and_adapter_reloads(tokenizer, tmp_path):
    base_dir = save_tiny_model("llama", tokenizer, tmp_path / "base")
    loaded = load_model(str(base_dir), "cpu")
    model = add_lora(loaded.model, target_modules(loaded.model), r=4, alpha=8, dropout=0.0, seed=0)
    before = mean_loss(model, tokenizer, TEXTS)
    history = finetune(model, tokenizer, TEXTS, epochs=4, batch_size=2, lr=1e-2, seed=0)
    after = mean_loss(model, tokenizer, TEXTS)
    assert len(history) == 8
    assert after < before - 0.1
    save_adapter(model, tokenizer, tmp_path / "adapter", str(base_dir))
    reloaded = load_model(str(tmp_path / "adapter"), "cpu")
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**ids).logits
        got = reloaded.model(**ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
