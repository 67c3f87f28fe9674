"""Self-Debias (Schick, Udupa and Schuetze 2021, "Self-Diagnosis and Self-Debiasing"), as a model wrapper that
every fairforget scorer accepts unchanged (StereoSet, CrowS-Pairs, BBQ letter and answer modes, perplexity).

At each position the next-token distribution p(w | x) is compared with the distributions after each
debiasing prefix y ("The following text discriminates against people because of their gender:"):
delta(w) = p(w | x) - max_y p(w | y, x). Tokens the prefixes make *more* likely are scaled down,

    alpha(w) = 1 if delta(w) >= 0 else max(exp(lambda * delta(w)), epsilon),
    p~(w | x) = alpha(w) p(w | x) / sum_v alpha(v) p(v | x),

with the decay constant lambda (50 in the paper) and the floor epsilon (0.01). lambda = 0 gives alpha = 1,
the plain model. The prefix is read before the scored sequence, starting with the tokenizer's conditioning
(BOS, else EOS) token; the sequence then follows unchanged with its own first token.

How it fits the scorers: the scorers call ``backbone_and_head(model)``, run the body and project its
``last_hidden_state`` with the head. Here the body returns the adjusted log-probabilities themselves and the
head passes them through (``log_softmax`` of a normalised log-distribution is itself). The shared-preamble
KV cache of ``fairforget.choice_scoring`` is honoured by :class:`TokenCache`, which only remembers the
preamble's tokens: every call recomputes the whole sequence (prefix and preamble included), so the result
equals scoring each sequence from scratch. Attention models only (Llama, GPT-2); 4-D masks and position ids
are extended over the prefix and the preamble.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from fairforget.errors import FairforgetError
from fairforget.methods.registry import Knob, MethodSpec, register_method
from fairforget.models import LoadedModel, load_model
from fairforget.scoring import backbone_and_head, conditioning_token_id

# bias-bench (Meade et al. 2022) prefixes, one per bias type, as Schick et al. wrote them
PREFIXES = {
    "gender": "The following text discriminates against people because of their gender:",
    "race-color": "The following text discriminates against people because of their race/color:",
    "religion": "The following text discriminates against people because of their religion:",
    "socioeconomic": "The following text discriminates against people because of their socioeconomic status/occupation:",
    "sexual-orientation": "The following text discriminates against people because of their sexual orientiation:",
    "age": "The following text discriminates against people because of their age:",
    "nationality": "The following text discriminates against people because of their nationality:",
    "disability": "The following text discriminates against people because of their disability:",
    "physical-appearance": "The following text discriminates against people because of their physical appearance:",
}
DEFAULT_DECAY = 50.0
DEFAULT_EPSILON = 0.01


def adjust(logp: torch.Tensor, logp_prefixed: Sequence[torch.Tensor], decay: float,
           epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """The Self-Debias log-distribution from the plain ``logp`` [..., V] and the prefixed ones (same shape)."""
    delta = logp.exp() - torch.stack(list(logp_prefixed)).max(dim=0).values.exp()
    log_alpha = torch.where(delta >= 0, torch.zeros_like(delta),
                            torch.clamp(decay * delta, min=float(torch.log(torch.tensor(epsilon)))))
    return torch.log_softmax(logp + log_alpha, dim=-1)


class TokenCache:
    """Stands in for a KV cache: the preamble's token ids, recomputed by the wrapper on every call."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.ids = self.ids.repeat_interleave(repeats, dim=0)


def _causal_block(n: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    block = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return block.expand(batch, 1, n, n)


def _prepend(ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
             extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Put ``extra`` [B, n] token ids before the sequence: they attend causally among themselves and are
    seen by every later token; later positions shift by n."""
    batch, n = extra.shape
    ids = torch.cat([extra, ids], dim=1)
    if mask is not None and mask.dim() == 2:
        mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    elif mask is not None:  # additive [B, 1, Q, K]: rows for the new tokens, columns they fill
        low = torch.finfo(mask.dtype).min
        top = torch.cat([_causal_block(n, batch, mask.dtype, mask.device),
                         mask.new_full((batch, 1, n, mask.shape[-1]), low)], dim=3)
        bottom = torch.cat([mask.new_zeros(batch, 1, mask.shape[2], n), mask], dim=3)
        mask = torch.cat([top, bottom], dim=2)
    if positions is not None:
        start = torch.arange(n, device=positions.device).expand(batch, n)
        positions = torch.cat([start, positions + n], dim=1)
    return ids, mask, positions


class SelfDebiasBody(torch.nn.Module):
    """Returns Self-Debias log-probabilities [B, Q, V] as ``last_hidden_state`` (see the module doc)."""

    def __init__(self, lm: Any, prefix_ids: Sequence[Sequence[int]], decay: float, epsilon: float) -> None:
        super().__init__()
        self.lm = lm
        self.prefix_ids = [list(p) for p in prefix_ids]
        self.decay = float(decay)
        self.epsilon = float(epsilon)

    def _logprobs(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                  skip: int = 0) -> torch.Tensor:
        """Log-distributions at every position but the first ``skip`` (the head never runs on those)."""
        body, head = backbone_and_head(self.lm)
        kwargs = {"position_ids": positions} if positions is not None else {}
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state
        return torch.log_softmax(head(hidden[:, skip:]).float(), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
                **_: Any) -> SimpleNamespace:
        ids, mask, positions, skip = input_ids, attention_mask, position_ids, 0
        if isinstance(past_key_values, TokenCache):  # recompute the preamble in front of this call's tokens
            preamble = past_key_values.ids.to(ids.device)
            skip = preamble.shape[1]
            if mask is not None and mask.dim() == 2 and mask.shape[1] == ids.shape[1] + skip:
                mask = mask[:, skip:]  # the caller's mask already covers the preamble
            elif mask is not None and mask.dim() == 4:
                mask = mask[..., skip:]
            if positions is not None:
                positions = positions - skip
            ids, mask, positions = _prepend(ids, mask, positions, preamble)
        elif past_key_values is not None:
            raise FairforgetError("the Self-Debias wrapper only continues from its own TokenCache")
        plain = self._logprobs(ids, mask, positions)
        prefixed = []
        for prefix in self.prefix_ids:
            extra = torch.tensor(prefix, device=ids.device).expand(ids.shape[0], len(prefix))
            p_ids, p_mask, p_pos = _prepend(ids, mask, positions, extra)
            prefixed.append(self._logprobs(p_ids, p_mask, p_pos, len(prefix)))
        out = adjust(plain, prefixed, self.decay, self.epsilon)[:, skip:]
        cache = TokenCache(torch.cat([past_key_values.ids.to(ids.device), input_ids], dim=1)
                           if isinstance(past_key_values, TokenCache) else input_ids) if use_cache else None
        return SimpleNamespace(last_hidden_state=out, past_key_values=cache)


class PassThroughHead(torch.nn.Module):
    """The 'LM head' of the wrapper: its input already is a log-distribution; ``weight`` only carries a dtype."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SelfDebiasLM(torch.nn.Module):
    """A causal LM scored with Self-Debias; pass it wherever a model is scored."""

    base_model_prefix = "debias_body"

    def __init__(self, lm: Any, tokenizer: Any, prefixes: Sequence[str], decay: float = DEFAULT_DECAY,
                 epsilon: float = DEFAULT_EPSILON) -> None:
        super().__init__()
        body, head = backbone_and_head(lm)
        if "cache_params" in inspect.signature(body.forward).parameters:
            raise FairforgetError("Self-Debias here supports attention models (Llama, GPT-2), not Mamba")
        if not prefixes:
            raise FairforgetError("Self-Debias needs at least one debiasing prefix")
        if decay < 0 or not 0 < epsilon <= 1:
            raise FairforgetError(f"Self-Debias needs decay >= 0 and 0 < epsilon <= 1, got {decay}, {epsilon}")
        start = conditioning_token_id(tokenizer)
        prefix_ids = [[start, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prefixes]
        self.debias_body = SelfDebiasBody(lm, prefix_ids, decay, epsilon)
        self.head = PassThroughHead(head.weight.dtype, head.weight.device)
        self.config = getattr(lm, "config", None)
        self.prefixes = list(prefixes)

    def get_output_embeddings(self) -> PassThroughHead:
        return self.head


@dataclass(frozen=True)
class SelfDebiasConfig:
    """Self-Debias's settings: the whole method (it changes no weight), saved as its output folder."""

    model: str  # the base model the wrapper scores with
    bias_types: list
    decay_constant: float = DEFAULT_DECAY
    epsilon: float = DEFAULT_EPSILON


def load_wrapper(folder: Path, config: dict, device: str = "auto") -> LoadedModel:
    """The Self-Debias wrapper a method folder describes, around its base model."""
    settings = SelfDebiasConfig(**config)
    loaded = load_model(settings.model, device)
    wrapped = SelfDebiasLM(loaded.model, loaded.tokenizer, [PREFIXES[b] for b in settings.bias_types],
                           settings.decay_constant, settings.epsilon)
    return LoadedModel(wrapped, loaded.tokenizer, f"self-debias-{loaded.name}",
                       f"{loaded.source} + Self-Debias ({folder})", loaded.device)


register_method(MethodSpec(
    name="self_debias", title="Self-Debias (Schick et al. 2021), a scoring wrapper", script="33_self_debias.py",
    config=SelfDebiasConfig, knobs=(Knob("decay_constant", "lambda of alpha(w) = exp(lambda delta(w))"),),
    zero_flags={"decay_constant": 0.0}, sizes={"selection_limit": 60}, output="wrapper", load=load_wrapper,
    saves_settings=True,
    inputs=lambda layout: [layout.stereoset], data_flags=lambda layout: {"stereoset": layout.stereoset}))
