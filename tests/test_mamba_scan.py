"""The fast Mamba scan must reproduce transformers' reference path (outputs and gradients)."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer, mamba_selective_scan

from fairforget import mamba_native
from fairforget.mamba_scan import disable_fast_mamba, enable_fast_mamba, selective_scan

RTOL = 1e-4
BACKENDS = ["native", "torch"]
TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=1000, state_size=16, expand=2, conv_kernel=4)
MAMBA_130M = dict(hidden_size=768, num_hidden_layers=1, vocab_size=1000, state_size=16, expand=2, conv_kernel=4)


def assert_close(actual, expected, name=""):
    """Relative error in norm, over the whole tensor."""
    error = (actual - expected).norm().item()
    assert error <= RTOL * expected.norm().item() + 1e-7, f"{name}: rel error {error / expected.norm().item():.2e}"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test with the compiled kernels and with the pure-PyTorch fallback."""
    if request.param == "native":
        if mamba_native.native_library() is None:
            pytest.fail("native kernels failed to build on this machine")
    else:
        monkeypatch.setenv("FAIRFORGET_MAMBA_NATIVE", "0")
    return request.param


def random_scan_inputs(batch, channels, state, length, gated):
    g = torch.Generator().manual_seed(length)
    inputs = dict(
        u=torch.randn(batch, channels, length, generator=g),
        delta=torch.randn(batch, channels, length, generator=g),
        A=-torch.rand(channels, state, generator=g) * 4,
        B=torch.randn(batch, state, length, generator=g),
        C=torch.randn(batch, state, length, generator=g),
        D=torch.randn(channels, generator=g),
        delta_bias=torch.randn(channels, generator=g),
    )
    if gated:
        inputs["z"] = torch.randn(batch, channels, length, generator=g)
    return {k: v.requires_grad_() for k, v in inputs.items()}


def reference_scan(u, delta, A, B, C, **options):
    """transformers' scan (names its first two arguments hidden_states and dt)."""
    return mamba_selective_scan(u, delta, A, B, C, delta_softplus=True, **options)


@pytest.mark.parametrize("length", [1, 7, 45])
@pytest.mark.parametrize("gated", [True, False])
def test_selective_scan_matches_reference(backend, length, gated):
    # 40 channels: two full 16-lane blocks and a partial one; 45 steps cross a 32-step chunk boundary.
    inputs = random_scan_inputs(batch=2, channels=40, state=16, length=length, gated=gated)
    expected, expected_state = reference_scan(**inputs, return_last_state=True)
    actual, actual_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert_close(actual, expected, "y")
    assert_close(actual_state, expected_state, "last state")

    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, list(inputs.values()), grad_out)
    actual_grads = torch.autograd.grad(actual, list(inputs.values()), grad_out)
    for name, a, e in zip(inputs, actual_grads, expected_grads):
        assert_close(a, e, f"grad {name}")


def test_initial_state_continues_the_scan(backend):
    """Scanning in two pieces, carrying the state, equals one scan (the generation-cache path)."""
    inputs = random_scan_inputs(batch=2, channels=40, state=16, length=50, gated=True)
    inputs = {k: v.detach() for k, v in inputs.items()}
    whole = selective_scan(**inputs)
    split = 20
    sequence_keys = ("u", "delta", "B", "C", "z")
    first = {k: v[..., :split] if k in sequence_keys else v for k, v in inputs.items()}
    second = {k: v[..., split:] if k in sequence_keys else v for k, v in inputs.items()}
    head, state = selective_scan(**first, return_last_state=True)
    tail = selective_scan(**second, initial_state=state)
    assert_close(torch.cat([head, tail], dim=-1), whole)


def clone_with_fast_path(model):
    fast = MambaForCausalLM(model.config)
    fast.load_state_dict(model.state_dict())
    fast.train(model.training)
    assert enable_fast_mamba(fast) == model.config.num_hidden_layers
    return fast


def loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    return output.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("length", [1, 37])
def test_mixer_130m_shape_matches_reference(backend, length):
    torch.manual_seed(length)
    mixer = MambaForCausalLM(MambaConfig(**MAMBA_130M)).backbone.layers[0].mixer
    hidden = torch.randn(2, length, 768, requires_grad=True)
    params = [hidden, *mixer.parameters()]

    expected = mixer(hidden)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    enable_fast_mamba(mixer)
    actual = mixer(hidden)
    actual_grads = torch.autograd.grad(actual.square().sum(), params)

    assert_close(actual, expected, "output")
    names = ["hidden_states", *(n for n, _ in mixer.named_parameters())]
    for name, a, e in zip(names, actual_grads, expected_grads):
        assert_close(a, e, f"grad {name}")


@pytest.mark.parametrize("length", [1, 9, 40])
def test_tiny_model_training_matches_reference(backend, length):
    torch.manual_seed(0)
    reference = MambaForCausalLM(MambaConfig(**TINY)).train()
    fast = clone_with_fast_path(reference)
    input_ids = torch.randint(0, TINY["vocab_size"], (3, length))

    expected_logits, expected_grads = loss_and_grads(reference, input_ids)
    actual_logits, actual_grads = loss_and_grads(fast, input_ids)
    assert_close(actual_logits, expected_logits, "logits")
    assert expected_grads.keys() == actual_grads.keys()
    for name in expected_grads:
        assert_close(actual_grads[name], expected_grads[name], name)


def test_scoring_in_eval_mode_matches_reference(backend):
    """Eval mode goes through the cache-filling path (use_cache defaults to True)."""
    torch.manual_seed(1)
    reference = MambaForCausalLM(MambaConfig(**TINY)).eval()
    fast = clone_with_fast_path(reference)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 23))
    with torch.no_grad():
        expected, actual = reference(input_ids), fast(input_ids)
    assert_close(actual.logits, expected.logits, "logits")
    for layer in range(TINY["num_hidden_layers"]):
        assert_close(actual.cache_params.get_recurrent_state(layer), expected.cache_params.get_recurrent_state(layer))
        assert_close(actual.cache_params.get_conv_state(layer), expected.cache_params.get_conv_state(layer))


@pytest.mark.parametrize("prompt_length", [1, 2, 11])
def test_greedy_generation_matches_reference(backend, prompt_length):
    torch.manual_seed(2)
    reference = MambaForCausalLM(MambaConfig(**TINY)).eval()
    fast = clone_with_fast_path(reference)
    prompt = torch.randint(0, TINY["vocab_size"], (2, prompt_length))
    settings = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(prompt, **settings)
    actual = fast.generate(prompt, **settings)
    assert torch.equal(actual.sequences, expected.sequences)
    for a, e in zip(actual.scores, expected.scores):
        assert_close(a, e, "scores")


def test_lora_gradients_match_reference(backend):
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj", "embeddings"], lora_dropout=0.0)
    reference = get_peft_model(MambaForCausalLM(MambaConfig(**TINY)), lora)
    fast = get_peft_model(MambaForCausalLM(MambaConfig(**TINY)), lora)
    fast.load_state_dict(reference.state_dict())
    for model in (reference, fast):  # LoRA B starts at zero; make the adapters contribute.
        for name, param in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    reference.train()
    fast.train()
    assert enable_fast_mamba(fast) == TINY["num_hidden_layers"]
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 19))

    expected_logits, expected_grads = loss_and_grads(reference, input_ids)
    actual_logits, actual_grads = loss_and_grads(fast, input_ids)
    assert_close(actual_logits, expected_logits, "logits")
    lora_names = [n for n in expected_grads if "lora_" in n]
    assert len(lora_names) == 2 * (2 * TINY["num_hidden_layers"] + 1)
    assert expected_grads.keys() == actual_grads.keys()
    for name in expected_grads:
        assert_close(actual_grads[name], expected_grads[name], name)


def test_disable_restores_reference_forward():
    torch.manual_seed(4)
    model = MambaForCausalLM(MambaConfig(**TINY)).eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        expected = model(input_ids).logits
        assert enable_fast_mamba(model) == 2
        assert all("forward" in vars(m) for m in model.modules() if isinstance(m, MambaMixer))
        assert disable_fast_mamba(model) == 2
        assert not any("forward" in vars(m) for m in model.modules())
        assert torch.equal(model(input_ids).logits, expected)


def test_environment_switch_disables_fast_path(monkeypatch):
    model = MambaForCausalLM(MambaConfig(**TINY)).eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    assert enable_fast_mamba(model) == 2
    monkeypatch.setenv("FAIRFORGET_FAST_MAMBA", "0")
    with torch.no_grad():  # already-patched mixers fall through to transformers' forward
        patched_output = model(input_ids).logits
        disable_fast_mamba(model)
        assert torch.equal(patched_output, model(input_ids).logits)
    assert enable_fast_mamba(model) == 0


def test_models_without_mamba_mixers_are_left_alone():
    assert enable_fast_mamba(torch.nn.Sequential(torch.nn.Linear(3, 3))) == 0


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    mamba_native._load_native_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falling back to the pure-PyTorch"):
            assert mamba_native.native_library() is None
        inputs = random_scan_inputs(batch=1, channels=20, state=16, length=9, gated=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is reported once, not on every call
            assert_close(selective_scan(**inputs), reference_scan(**inputs))
    finally:
        mamba_native._load_native_library.cache_clear()
