"""Attention heads: where each head's output lives, capturing it, correlating it, and soft-pruning it.

A head's output is the slice ``[..., h*d:(h+1)*d]`` of the input of its layer's output projection
(``self_attn.o_proj`` in Llama-like models, ``attn.c_proj`` in GPT-2). Forward pre-hooks on those
projections see every layer's heads in one forward pass. Scaling the projection's weight columns of one
query head by ``(1 - s)`` scales exactly that head's contribution to the residual stream: it is correct
under grouped-query attention (k/v projections, shared by several query heads, are never touched) and it
survives ``save_pretrained``. GPT-2's ``Conv1D`` stores the weight transposed ([in, out]), so there the
head's slice is a block of rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from fairforget.choice_scoring import encode_prompt, letter_token_ids, option_logprobs
from fairforget.errors import FairforgetError
from fairforget.scoring import Encoded, backbone_and_head, collate, length_sorted_batches

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense")


@dataclass(frozen=True)
class HeadLayout:
    """Per layer: the attention module and its output projection; the query-head count and head size."""

    attentions: tuple[nn.Module, ...]
    out_projs: tuple[nn.Module, ...]
    out_proj_name: str
    n_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.out_projs)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)


def _is_transposed(proj: nn.Module) -> bool:
    """True for GPT-2's Conv1D (weight [in, out]); False for nn.Linear (weight [out, in])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(proj, Conv1D):
        return True
    if isinstance(proj, nn.Linear):
        return False
    raise FairforgetError(f"unsupported output projection type {type(proj).__name__} (need Linear or Conv1D)")


def decoder_layers(model: Any) -> nn.ModuleList:
    """The stack of decoder blocks of a causal LM (the longest ModuleList in its body)."""
    body, _ = backbone_and_head(model)
    lists = [m for m in body.children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise FairforgetError(f"{type(body).__name__} has no stack of layers")
    return max(lists, key=len)


def head_layout(model: Any) -> HeadLayout:
    """Find every layer's attention and output projection; a FairforgetError for models without heads."""
    config = model.config
    attentions, projs, proj_name = [], [], None
    for layer in decoder_layers(model):
        attn = next((getattr(layer, n) for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), nn.Module)),
                    None)
        name = next((n for n in OUT_PROJ_NAMES if isinstance(getattr(attn, n, None), nn.Module)), None)
        if attn is None or name is None:
            break
        attentions.append(attn)
        projs.append(getattr(attn, name))
        proj_name = name
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not projs or len(projs) != len(decoder_layers(model)) or not n_heads:
        raise FairforgetError(
            f"model type {getattr(config, 'model_type', type(model).__name__)!r} has no attention heads in every "
            f"layer (state-space models such as Mamba have none): head analysis and pruning need an attention model")
    head_dim = getattr(attentions[0], "head_dim", None) or getattr(config, "head_dim", None)
    width = projs[0].weight.shape[0 if _is_transposed(projs[0]) else 1]
    head_dim = head_dim or width // n_heads
    if width != n_heads * head_dim:
        raise FairforgetError(f"output projection takes {width} inputs, not {n_heads} heads x {head_dim}")
    return HeadLayout(tuple(attentions), tuple(projs), proj_name, int(n_heads), int(head_dim))


def _head_weight_view(layout: HeadLayout, layer: int) -> torch.Tensor:
    """The output projection's weight viewed with a head axis first: [n_heads, head_dim, out]."""
    proj = layout.out_projs[layer]
    weight = proj.weight
    if _is_transposed(proj):
        return weight.view(layout.n_heads, layout.head_dim, -1)
    return weight.view(weight.shape[0], layout.n_heads, layout.head_dim).permute(1, 2, 0)


def scale_heads(model: Any, strengths: torch.Tensor, layout: HeadLayout | None = None) -> HeadLayout:
    """Soft-prune in place: multiply each query head's slice of its output projection by ``1 - strengths[l, h]``."""
    layout = layout or head_layout(model)
    strengths = torch.as_tensor(strengths, dtype=torch.float64)
    if tuple(strengths.shape) != layout.shape:
        raise FairforgetError(f"pruning strengths have shape {tuple(strengths.shape)}, the model has "
                              f"{layout.n_layers} layers x {layout.n_heads} heads")
    if not bool(((strengths >= 0) & (strengths <= 1)).all()):
        raise FairforgetError("pruning strengths must lie in [0, 1]")
    with torch.no_grad():
        for layer in range(layout.n_layers):
            view = _head_weight_view(layout, layer)
            keep = (1 - strengths[layer]).to(view.dtype).to(view.device)
            view.mul_(keep[:, None, None])
    return layout


@contextlib.contextmanager
def head_hooks(layout: HeadLayout, gates: torch.Tensor | None = None,
               on_heads: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[None]:
    """Forward pre-hooks on every output projection while the context is open.

    ``gates`` [layers, heads] multiplies each head's output (differentiable, for importance estimates), or
    [batch, layers, heads] one gate per row, so one backward pass gives every row's own gradient;
    ``on_heads(layer, x)`` receives each layer's head outputs ``x`` [batch, seq, heads, head_dim] after gating.
    """
    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            heads = x.view(*x.shape[:-1], layout.n_heads, layout.head_dim)
            if gates is not None:
                gate = gates[layer][:, None] if gates.dim() == 2 else gates[:, layer][:, None, :, None]
                heads = heads * gate.to(heads.dtype)
            if on_heads is not None:
                on_heads(layer, heads)
            if gates is not None:
                return (heads.reshape(x.shape), *args[1:])
            return None
        return hook

    handles = [proj.register_forward_pre_hook(make_hook(i)) for i, proj in enumerate(layout.out_projs)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batch_prompts(tokenizer: Any, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of whole prompts (tokenized as the BBQ scorer does),
    and each row's last position ``last``."""
    encoded = [Encoded(tuple(encode_prompt(tokenizer, p)), 0) for p in prompts]
    batch = collate(encoded, tokenizer.pad_token_id, device)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "last": batch["attention_mask"].sum(dim=1) - 1}


def letter_logprobs_and_heads(model: Any, layout: HeadLayout | None, batch: dict[str, torch.Tensor],
                              letter_variants: Sequence[Sequence[int]], gates: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass: log p(letter) of the next token at each row's last position [batch, letters] (each
    letter's token variants summed, as :func:`fairforget.choice_scoring.option_letter_logprobs` does), and
    (with a layout) every head's output there [batch, layers, heads, head_dim]."""
    body, lm_head = backbone_and_head(model)
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    captured: dict[int, torch.Tensor] = {}

    def keep_last(layer: int, heads: torch.Tensor) -> None:
        captured[layer] = heads[rows, batch["last"]].detach().float()

    hooks = head_hooks(layout, gates, keep_last) if layout is not None else contextlib.nullcontext()
    with hooks:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    logprobs = torch.log_softmax(lm_head(hidden[rows, batch["last"]]).float(), dim=-1)
    letters = torch.stack([torch.logsumexp(logprobs[:, list(ids)], dim=-1) for ids in letter_variants], dim=1)
    heads = torch.stack([captured[i] for i in range(layout.n_layers)], dim=1) if layout is not None else None
    return letters, heads


def context_influence(p_full: torch.Tensor, p_question: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p_full || p_question) per row: how much the context moves the option-letter distribution."""
    p_full = p_full / p_full.sum(-1, keepdim=True)
    p_question = p_question / p_question.sum(-1, keepdim=True)
    return (p_full * (torch.log(p_full.clamp_min(eps)) - torch.log(p_question.clamp_min(eps)))).sum(-1)


@dataclass
class HeadActivity:
    """Per example: the option distributions with and without the context, their KL (context influence),
    and per head at the answer position the output norm (full prompt) and the distance full vs context-free."""

    p_full: torch.Tensor  # [examples, options]
    p_question: torch.Tensor
    influence: torch.Tensor  # [examples]
    norm: torch.Tensor  # [examples, layers, heads]
    delta: torch.Tensor


def answer_distribution(model: Any, tokenizer: Any, prompts: Sequence[str], options: Sequence[Sequence[str]],
                        batch_size: int = 16) -> torch.Tensor:
    """Answer mode's option distribution: softmax of each option text's per-token mean log-likelihood."""
    scores = option_logprobs(model, tokenizer, prompts, options, batch_size)
    return torch.softmax(torch.tensor([[s.mean for s in row] for row in scores], dtype=torch.float64), -1).float()


def head_activity(model: Any, tokenizer: Any, full_prompts: Sequence[str], question_prompts: Sequence[str],
                  letters: Sequence[str] = "ABC", batch_size: int = 16,
                  options: Sequence[Sequence[str]] | None = None) -> HeadActivity:
    """One forward pass per prompt variant captures every layer's heads at the answer position (the last
    prompt token, the position both modes read the answer from) and the option-letter distribution.

    With ``options`` (each prompt's answer texts in shown order: answer mode) the distributions are answer
    mode's instead (:func:`answer_distribution`, the same options after both prompt variants)."""
    if len(full_prompts) != len(question_prompts) or not full_prompts:
        raise FairforgetError(f"need the same non-zero number of full and context-free prompts "
                              f"({len(full_prompts)} vs {len(question_prompts)})")
    if batch_size < 1:
        raise FairforgetError(f"batch size must be at least 1, got {batch_size}")
    layout = head_layout(model)
    variants = letter_token_ids(tokenizer, letters)
    device = next(model.parameters()).device
    n = len(full_prompts)
    logp = {"full": torch.empty(n, len(letters)), "question": torch.empty(n, len(letters))}
    norm, delta = torch.empty(n, *layout.shape), torch.empty(n, *layout.shape)
    lengths = [len(encode_prompt(tokenizer, p)) for p in full_prompts]
    with torch.inference_mode():
        for idx in length_sorted_batches(lengths, batch_size):
            heads = {}
            for name, prompts in (("full", full_prompts), ("question", question_prompts)):
                batch = batch_prompts(tokenizer, [prompts[i] for i in idx], device)
                letter_logprobs, heads[name] = letter_logprobs_and_heads(model, layout, batch, variants)
                logp[name][idx] = letter_logprobs.cpu()
            norm[idx] = heads["full"].norm(dim=-1).cpu()
            delta[idx] = (heads["full"] - heads["question"]).norm(dim=-1).cpu()
    if options is None:
        p_full, p_question = torch.softmax(logp["full"], -1), torch.softmax(logp["question"], -1)
    else:
        p_full = answer_distribution(model, tokenizer, full_prompts, options, batch_size)
        p_question = answer_distribution(model, tokenizer, question_prompts, options, batch_size)
    return HeadActivity(p_full, p_question, context_influence(p_full, p_question), norm, delta)


def head_correlations(activity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson r of every head's scalar with ``target``: ``activity`` [examples, layers, heads] -> r [layers, heads].

    One ``torch.corrcoef`` over all heads; a head (or target) with no variance gets r = 0.
    """
    n, layers, heads = activity.shape
    if target.shape != (n,):
        raise FairforgetError(f"{n} head activity rows but {tuple(target.shape)} targets")
    if n < 3:
        raise FairforgetError(f"correlating heads needs at least 3 examples, got {n}")
    rows = torch.cat([activity.reshape(n, -1).T, target.reshape(1, n)], dim=0).double()
    r = torch.corrcoef(rows)[:-1, -1]
    return torch.nan_to_num(r, nan=0.0).reshape(layers, heads)


def correlation_pvalues(r: torch.Tensor, n: int) -> torch.Tensor:
    """Two-sided p-values of Pearson r over ``n`` examples under no correlation (t test with n - 2 dof)."""
    from scipy.stats import t as student_t

    r = r.double().clamp(-1 + 1e-12, 1 - 1e-12)
    stat = r * ((n - 2) / (1 - r * r)).sqrt()
    return torch.from_numpy(2 * student_t.sf(stat.abs().numpy(), n - 2))


def gate_gradient(model: Any, layout: HeadLayout, losses: Sequence[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """d(sum of the losses)/d(gate) [layers, heads] at gates 1: each loss closure runs inside gated hooks;
    only the gates get gradients."""
    device = next(model.parameters()).device
    gates = torch.ones(layout.shape, device=device, requires_grad=True)
    with frozen_weights(model), torch.enable_grad(), head_hooks(layout, gates):
        for loss in losses:
            loss().backward()
    return gates.grad.detach().double().cpu()


@contextlib.contextmanager
def frozen_weights(model: Any) -> Iterator[None]:
    """While open, no model parameter needs a gradient (only gates do); restored afterwards."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


@contextlib.contextmanager
def pruned(model: Any, strengths: torch.Tensor, layout: HeadLayout | None = None) -> Iterator[Any]:
    """The model soft-pruned by ``strengths`` while the context is open; its output projections restored after."""
    layout = layout or head_layout(model)
    saved = [proj.weight.detach().clone() for proj in layout.out_projs]
    scale_heads(model, strengths, layout)
    try:
        yield model
    finally:
        with torch.no_grad():
            for proj, weight in zip(layout.out_projs, saved):
                proj.weight.copy_(weight)


def pruning_cost(model: Any, layout: HeadLayout, batches: Sequence[dict[str, torch.Tensor]],
                 gold: Sequence[torch.Tensor], letter_variants: Sequence[Sequence[int]],
                 strengths: torch.Tensor) -> torch.Tensor:
    """First-order estimate of how much pruning each head alone (by its strength) raises the answer loss.

    The loss is the mean cross-entropy of the gold option letter, renormalised over the letters. With a gate g[l, h] on
    every head's output (1 = unchanged), pruning head (l, h) by s moves g from 1 to 1 - s, so the loss
    changes by about ``-s * dLoss/dg`` (Taylor importance, Michel et al. 2019). One backward pass per batch
    gives every head's estimate. Positive means pruning that head hurts answering.
    """
    device = next(model.parameters()).device
    total = sum(len(g) for g in gold)

    def loss_of(batch: dict[str, torch.Tensor], answers: torch.Tensor) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            logprobs, _ = letter_logprobs_and_heads(model, None, batch, letter_variants)
            return torch.nn.functional.cross_entropy(logprobs, answers.to(device), reduction="sum") / total
        return loss

    return -strengths.double() * gate_gradient(model, layout, [loss_of(b, g) for b, g in zip(batches, gold)])


def protect_heads(strengths: torch.Tensor, cost: torch.Tensor, top_n: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Set to 0 the strengths of the ``top_n`` selected heads whose pruning costs the most (FASP-style)."""
    if top_n < 0:
        raise FairforgetError(f"--protect-top must be >= 0, got {top_n}")
    selected = torch.nonzero(strengths > 0)
    if top_n == 0 or len(selected) == 0:
        return strengths.clone(), []
    costs = cost[selected[:, 0], selected[:, 1]]
    order = torch.argsort(costs, descending=True)[:top_n]
    protected = [tuple(int(v) for v in selected[i]) for i in order if costs[i] > 0]
    out = strengths.clone()
    for layer, head in protected:
        out[layer, head] = 0.0
    return out, protected
