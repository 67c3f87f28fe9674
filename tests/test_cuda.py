"""CUDA against CPU: the scorer, BBQ, a PCGU step and Mamba with the mamba-ssm kernels give the CPU's numbers.

Run by ``scripts/gpu_check.sh`` (``pytest -m cuda -s``, which also prints throughput); every test here is
marked ``cuda`` and skips when torch sees no CUDA device. Both sides are fp32 with TF32 off. Tolerances:

* scores (summed log-probabilities of 5-40 tokens) and BBQ option / letter log-probabilities: 1e-3 absolute
  (different kernels reassociate sums; CPU batched-vs-alone differences are ~1e-5);
* a PCGU step: the batch objectives within 1e-3, at least 99% of the selected partitions the same (a cosine
  near the cut may swap), the updated weights within 1e-5 of each other outside swapped partitions' rows;
* Mamba forward+backward with the mamba-ssm CUDA kernels: logits within 1e-3 absolute, each parameter's
  gradient within 1e-2 of the CPU gradient relative to its norm (the fused scan recomputes in another order).

Set ``FAIRFORGET_REQUIRE_MAMBA_SSM=1`` (gpu_check.sh does) to fail, rather than skip, when mamba-ssm is missing.
``FAIRFORGET_CHECK_DEVICE=cpu`` runs the same comparisons with a second CPU copy in place of CUDA (the Mamba
test then compares fairforget's CPU scan with transformers' own path): how the check itself is tested
on machines without a GPU.
"""

import copy
import importlib.util
import os
import time

import pytest
import torch

from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_eval import answer_continuation, build_prompt, option_order
from fairforget.choice_scoring import option_letter_logprobs, option_logprobs
from fairforget.mamba_scan import disable_fast_mamba, enable_fast_mamba
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.methods.pcgu import encode_pairs, partition_tensors, pcgu_step
from fairforget.scoring import collate, encode, score_continuations
from fairforget.evals.stereoset import load_stereoset, score_examples, stratified_limit
from fairforget.winogender import load_winogender_pairs

OTHER = os.environ.get("FAIRFORGET_CHECK_DEVICE", "cuda")  # the device compared with the CPU
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(OTHER == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device (run scripts/gpu_check.sh on a machine with one)")]

SCORE_ATOL = 1e-3
ON_CUDA = OTHER == "cuda"
N_STEREOSET, BBQ_PER_CATEGORY = (200, 3) if ON_CUDA else (16, 1)  # the CPU-only self-test stays small


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def smollm():
    """The embedded SmolLM2-135M-Instruct on CPU and on the compared device."""
    return load_model(DEFAULT_EMBEDDED, "cpu"), load_model(DEFAULT_EMBEDDED, OTHER)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def report(what: str, units: float, unit: str, cpu_s: float, cuda_s: float) -> None:
    print(f"\n[gpu check] {what}: CPU {units / cpu_s:,.1f} {unit}/s, {OTHER} {units / cuda_s:,.1f} {unit}/s "
          f"({cpu_s / cuda_s:.1f}x)")


def test_scorer_and_stereoset_match_cpu(smollm, shared_data):
    (cpu, cuda) = smollm
    examples = stratified_limit(load_stereoset(shared_data / "stereoset" / "dev.json"), N_STEREOSET, seed=0)
    items_cpu, cpu_s = timed(lambda: score_examples(cpu.model, cpu.tokenizer, examples, batch_size=32))
    score_examples(cuda.model, cuda.tokenizer, examples, batch_size=32)  # warm-up
    items_cuda, cuda_s = timed(lambda: score_examples(cuda.model, cuda.tokenizer, examples, batch_size=96))
    diffs = [abs(a["logprob_sum"] - b["logprob_sum"]) for a, b in zip(items_cpu, items_cuda)]
    assert [a["n_tokens"] for a in items_cpu] == [b["n_tokens"] for b in items_cuda]
    assert max(diffs) < SCORE_ATOL, max(diffs)
    report(f"StereoSet scoring, {len(examples)} examples (max |diff| {max(diffs):.1e})", 3 * len(examples),
           "sentences", cpu_s, cuda_s)
    sentences = [("", s) for e in examples for _, s in e.sentences.values()]
    a = score_continuations(cpu.model, cpu.tokenizer, sentences[:64], batch_size=16)
    b = score_continuations(cuda.model, cuda.tokenizer, sentences[:64], batch_size=64)
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) < SCORE_ATOL


def test_bbq_options_and_letters_match_cpu(smollm, shared_data):
    (cpu, cuda) = smollm
    examples = sample_per_category(load_bbq(shared_data / "bbq").examples, BBQ_PER_CATEGORY, seed=0)
    prompts, options = [], []
    for e in examples:
        order = option_order(e)
        prompt = build_prompt(e, order, chat_tokenizer=cpu.tokenizer)
        prompts.append(prompt)
        options.append([answer_continuation(prompt, e.answers[i]) for i in order])
    opt_cpu, cpu_s = timed(lambda: option_logprobs(cpu.model, cpu.tokenizer, prompts, options, batch_size=8))
    option_logprobs(cuda.model, cuda.tokenizer, prompts, options, batch_size=8)  # warm-up
    opt_cuda, cuda_s = timed(lambda: option_logprobs(cuda.model, cuda.tokenizer, prompts, options, batch_size=32))
    diff = max(abs(x.logprob - y.logprob) for ra, rb in zip(opt_cpu, opt_cuda) for x, y in zip(ra, rb))
    assert diff < SCORE_ATOL, diff
    report(f"BBQ answer scoring, {len(prompts)} prompts (max |diff| {diff:.1e})", len(prompts), "prompts",
           cpu_s, cuda_s)
    letters_cpu = option_letter_logprobs(cpu.model, cpu.tokenizer, prompts)
    letters_cuda = option_letter_logprobs(cuda.model, cuda.tokenizer, prompts)
    assert torch.allclose(letters_cpu, letters_cuda.cpu(), atol=SCORE_ATOL)


def test_pcgu_step_matches_cpu(tiny_models, tokenizer, shared_data):
    root = shared_data / "winogender" / "data"
    pairs = load_winogender_pairs(root / "all_sentences.tsv", root / "occupations-stats.tsv")[:16]
    adv, dis = encode_pairs(tokenizer, pairs)
    models = {"cpu": copy.deepcopy(tiny_models["llama"]), "cuda": copy.deepcopy(tiny_models["llama"]).to(OTHER)}
    results, seconds, tensors = {}, {}, {}
    for device, model in models.items():
        for p in model.parameters():
            p.requires_grad_(True)
        tensors[device] = partition_tensors(model)
        if device == "cuda":  # warm-up on a throwaway copy, so the timed step starts from the same weights
            warm = copy.deepcopy(model)
            pcgu_step(warm, partition_tensors(warm), adv, dis, tokenizer.pad_token_id, k=200, lr=0.0)
        results[device], seconds[device] = timed(
            lambda: pcgu_step(model, tensors[device], adv, dis, tokenizer.pad_token_id, k=200, lr=1e-3))
    a, b = results["cpu"], results["cuda"]
    assert max(abs(x - y) for x, y in zip(a.f_adv + a.f_dis, b.f_adv + b.f_dis)) < SCORE_ATOL
    assert abs(sum(a.selected) - sum(b.selected)) <= 0.01 * sum(a.selected)
    assert sum(abs(x - y) for x, y in zip(a.selected, b.selected)) <= 0.02 * sum(a.selected) + 2
    close = [torch.isclose(t.param.detach(), u.param.detach().cpu(), atol=1e-5).float().mean().item()
             for t, u in zip(tensors["cpu"], tensors["cuda"])]
    assert min(close) > 0.98, min(close)
    report(f"PCGU step, batch 16 pairs, tiny Llama ({sum(a.selected)} partitions)", 1, "steps",
           seconds["cpu"], seconds["cuda"])


def test_mamba_kernels_forward_backward_match_cpu(tiny_models, tokenizer, shared_data):
    if ON_CUDA:
        if importlib.util.find_spec("mamba_ssm") is None:
            if os.environ.get("FAIRFORGET_REQUIRE_MAMBA_SSM") == "1":
                pytest.fail("mamba-ssm is not installed (pip install -r requirements-cuda.txt)")
            pytest.skip("mamba-ssm is not installed")
        from transformers.models.mamba import modeling_mamba

        assert modeling_mamba.is_fast_path_available, "mamba-ssm / causal-conv1d kernels did not load"
    texts = [s for e in load_stereoset(shared_data / "stereoset" / "dev.json")[:16] for _, s in e.sentences.values()]
    batch = collate([encode(tokenizer, "", t) for t in texts], tokenizer.pad_token_id)
    outputs, seconds = {}, {}
    for side, device in (("cpu", "cpu"), ("other", OTHER)):
        model = copy.deepcopy(tiny_models["mamba"]).to(device).train()
        # CPU: fairforget's fast scan; the other side: transformers' path, which on CUDA is the mamba-ssm kernels
        (enable_fast_mamba if side == "cpu" else disable_fast_mamba)(model)
        ids, mask, targets = (batch[k].to(device) for k in ("input_ids", "attention_mask", "target_mask"))

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, attention_mask=mask).logits
            picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            (-(picked * targets[:, 1:]).sum()).backward()
            return logits.detach().cpu()

        step()  # warm-up
        logits, seconds[side] = timed(step)
        outputs[side] = (logits, {n: p.grad.detach().cpu() for n, p in model.named_parameters()})
    (l_cpu, g_cpu), (l_other, g_other) = outputs["cpu"], outputs["other"]
    real = batch["attention_mask"].bool()  # the fused training kernel does not zero right-padding positions
    assert torch.allclose(l_cpu[real], l_other[real], atol=1e-3), (l_cpu[real] - l_other[real]).abs().max()
    for name, grad in g_cpu.items():
        rel = (grad - g_other[name]).norm() / grad.norm().clamp(min=1e-12)
        assert rel < 1e-2, (name, float(rel))
    n_tokens = int(batch["attention_mask"].sum())
    report(f"tiny Mamba forward+backward, {OTHER} via transformers' path ({len(texts)} sentences)", n_tokens,
           "tokens", seconds["cpu"], seconds["other"])
