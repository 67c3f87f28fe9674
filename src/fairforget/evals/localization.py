"""Where a model's processing of BBQ prompts happens: per-layer and per-head statistics, aggregated on the fly.

Hooks reduce every layer's residual stream, MLP output, head outputs and attention map to small per-example
statistics during the forward pass (one layer's map exists at a time, as in eager attention itself), and a
running sum per group keeps memory independent of the number and length of prompts. Statistics:

- ``hidden_norm_last`` / ``hidden_norm_mean`` [layers]: L2 norm of the residual stream after each layer
  (before the final norm) at the last prompt position / averaged over the prompt's tokens.
- ``mlp_norm_last`` / ``mlp_norm_mean`` [layers]: the same for each layer's MLP output.
- ``head_norm_last`` [layers, heads]: norm of each head's output (input of the output projection) at the last position.
- ``attn_entropy_last`` / ``attn_entropy_mean`` [layers, heads]: entropy (nats) of the attention distribution
  of the last position / averaged over query positions.
- ``attn_max_last``: the largest attention weight of the last position.
- ``attn_context_last`` / ``attn_question_last`` [layers, heads]: attention mass of the last position on the
  context tokens / the question tokens (the rest goes to instructions, options and the answer cue).

Attention maps need eager attention (:func:`use_eager_attention`); ``head_mask`` no longer exists in
transformers 5, so nothing here depends on it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fairforget.artifacts import atomic_path, write_csv, write_json, write_jsonl
from fairforget.choice_scoring import encode_prompt
from fairforget.errors import FairforgetError
from fairforget.evals.bbq_eval import build_prompt, option_order
from fairforget.heads import HeadLayout, batch_prompts, decoder_layers, head_hooks, head_layout
from fairforget.plots import layer_head_panel, new_figure, save_figure
from fairforget.progress import progress
from fairforget.scoring import backbone_and_head, length_sorted_batches

LAYER_STATS = ("hidden_norm_last", "hidden_norm_mean", "mlp_norm_last", "mlp_norm_mean")
HEAD_STATS = ("head_norm_last", "attn_entropy_last", "attn_entropy_mean", "attn_max_last",
              "attn_context_last", "attn_question_last")
REGION_OTHER, REGION_CONTEXT, REGION_QUESTION = 0, 1, 2


@dataclass(frozen=True)
class LocalizationPrompt:
    """A prompt, the exact context and question strings inside it, and the groups it counts towards."""

    text: str
    context: str
    question: str
    groups: tuple[str, ...]


@dataclass
class Aggregate:
    """Running sums of per-example statistics per group; :meth:`means` divides by the counts."""

    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=lambda: defaultdict(dict))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, groups: Sequence[Sequence[str]], stats: dict[str, np.ndarray]) -> None:
        for row, row_groups in enumerate(groups):
            for group in row_groups:
                self.counts[group] += 1
                for name, values in stats.items():
                    current = self.sums[group].get(name)
                    self.sums[group][name] = values[row].astype(np.float64) + (0 if current is None else current)

    def means(self) -> dict[str, dict[str, np.ndarray]]:
        return {g: {n: v / self.counts[g] for n, v in stats.items()} for g, stats in self.sums.items()}


def use_eager_attention(model: Any) -> None:
    """Switch the model to eager attention, the implementation that returns attention maps."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_attn_implementation("eager")


def token_regions(tokenizer: Any, prompt: str, context: str, question: str) -> np.ndarray:
    """Per token of ``prompt``: 1 inside the context, 2 inside the question, 0 elsewhere (by character offsets).

    Tokens are those of :func:`fairforget.choice_scoring.encode_prompt` (no special tokens added when the
    prompt already starts with BOS text).
    """
    bos = tokenizer.bos_token
    encoding = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)), return_offsets_mapping=True)
    if list(encoding["input_ids"]) != encode_prompt(tokenizer, prompt):
        raise FairforgetError("token offsets disagree with the scorer's tokenization of the prompt")
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    regions = np.zeros(len(offsets), dtype=np.int64)
    start = 0
    for text, code in ((context, REGION_CONTEXT), (question, REGION_QUESTION)):
        if not text:
            continue
        begin = prompt.find(text, start)
        if begin < 0:
            raise FairforgetError(f"the prompt does not contain its {'context' if code == 1 else 'question'} "
                                  f"text {text[:60]!r}")
        end = begin + len(text)
        inside = (offsets[:, 0] < end) & (offsets[:, 1] > begin) & (offsets[:, 1] > offsets[:, 0])
        regions[inside] = code
        start = end
    return regions


def _entropy(weights: torch.Tensor) -> torch.Tensor:
    return -(weights * torch.log(weights.clamp_min(1e-30))).sum(-1)


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def batch_statistics(model: Any, layout: HeadLayout, batch: dict[str, torch.Tensor],
                     regions: torch.Tensor) -> dict[str, np.ndarray]:
    """One forward pass; every statistic of the module docstring per row of the batch."""
    mask = batch["attention_mask"].bool()
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = batch["last"]
    n_tokens = mask.sum(1).float()
    per_layer: dict[str, list] = defaultdict(lambda: [None] * layout.n_layers)

    def norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = x.float().norm(dim=-1)
        return norm[rows, last], (norm * mask).sum(1) / n_tokens

    def on_layer(name: str, layer: int):
        def hook(module, args, output):
            per_layer[f"{name}_norm_last"][layer], per_layer[f"{name}_norm_mean"][layer] = norms(_layer_output(output))
        return hook

    def on_attention(layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise FairforgetError("attention maps are not available: load the model with eager attention "
                                      "(fairforget.evals.localization.use_eager_attention)")
            weights = weights.float()  # [batch, heads, query, key]
            at_last = weights[rows, :, last]  # [batch, heads, key]
            per_layer["attn_entropy_last"][layer] = _entropy(at_last)
            entropy = torch.where(mask[:, None, :], _entropy(weights), 0.0)  # padded queries count 0
            per_layer["attn_entropy_mean"][layer] = entropy.sum(-1) / n_tokens[:, None]
            per_layer["attn_max_last"][layer] = at_last.max(-1).values
            for name, code in (("attn_context_last", REGION_CONTEXT), ("attn_question_last", REGION_QUESTION)):
                per_layer[name][layer] = (at_last * (regions == code)[:, None, :]).sum(-1)
        return hook

    def on_heads(layer: int, heads: torch.Tensor) -> None:
        per_layer["head_norm_last"][layer] = heads[rows, last].float().norm(dim=-1)

    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_hook(on_layer("hidden", i)))
        handles.append(layer.mlp.register_forward_hook(on_layer("mlp", i)))
        handles.append(layout.attentions[i].register_forward_hook(on_attention(i)))
    body, _ = backbone_and_head(model)
    try:
        with torch.inference_mode(), head_hooks(layout, on_heads=on_heads):
            body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.stack(values, dim=1).cpu().numpy() for name, values in per_layer.items()}


def localize(model: Any, tokenizer: Any, prompts: Sequence[LocalizationPrompt], batch_size: int = 8) -> Aggregate:
    """Aggregate every statistic over ``prompts`` per group; needs eager attention and an MLP in every layer."""
    if batch_size < 1:
        raise FairforgetError(f"batch size must be at least 1, got {batch_size}")
    layout = head_layout(model)
    if any(not hasattr(layer, "mlp") for layer in decoder_layers(model)):
        raise FairforgetError(f"{type(model).__name__} layers have no `mlp` submodule to read")
    device = next(model.parameters()).device
    regions = [token_regions(tokenizer, p.text, p.context, p.question) for p in prompts]
    aggregate = Aggregate()
    for idx in progress(length_sorted_batches([len(r) for r in regions], batch_size), desc="localizing",
                        unit="batch"):
        batch = batch_prompts(tokenizer, [prompts[i].text for i in idx], device)
        width = batch["input_ids"].shape[1]
        region = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            region[row, : len(regions[i])] = torch.from_numpy(regions[i])
        stats = batch_statistics(model, layout, batch, region.to(device))
        aggregate.add([prompts[i].groups for i in idx], stats)
    return aggregate


def summary_rows(means: dict[str, dict[str, np.ndarray]], counts: dict[str, int]) -> list[dict]:
    """Long-format rows (group, layer, head, statistics...); layer statistics have head = ''."""
    rows = []
    for group in sorted(means):
        stats = means[group]
        n_layers, n_heads = stats["head_norm_last"].shape
        for layer in range(n_layers):
            base = {"group": group, "n": counts[group], "layer": layer}
            rows.append({**base, "head": "", **{s: float(stats[s][layer]) for s in LAYER_STATS}})
            for head in range(n_heads):
                rows.append({**base, "head": head, **{s: float(stats[s][layer, head]) for s in HEAD_STATS}})
    return rows


def group_summary(means: dict[str, dict[str, np.ndarray]], counts: dict[str, int], top: int = 5) -> dict:
    """Per group: count, per-layer curves (head statistics averaged over heads) and the top heads per statistic."""
    out = {}
    for group in sorted(means):
        stats = means[group]
        n_heads = stats["head_norm_last"].shape[1]
        entry: dict[str, Any] = {"n": counts[group], "per_layer": {}}
        for name in LAYER_STATS:
            entry["per_layer"][name] = [round(float(v), 6) for v in stats[name]]
        for name in HEAD_STATS:
            entry["per_layer"][name + "_head_mean"] = [round(float(v), 6) for v in stats[name].mean(1)]
        entry["top_heads"] = {}
        for name in ("attn_context_last", "attn_question_last", "head_norm_last"):
            flat = np.argsort(stats[name].ravel())[::-1][:top]
            entry["top_heads"][name] = [{"layer": int(i // n_heads), "head": int(i % n_heads),
                                         "value": round(float(stats[name].ravel()[i]), 6)} for i in flat]
        out[group] = entry
    return out


def save_arrays(path: Path | str, means: dict[str, dict[str, np.ndarray]], counts: dict[str, int]) -> None:
    """All means in one ``.npz`` (keys ``GROUP::STAT`` and ``GROUP::n``), written atomically."""
    arrays = {f"{g}::{n}": v for g, stats in means.items() for n, v in stats.items()}
    arrays.update({f"{g}::n": np.array(c) for g, c in counts.items()})
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_arrays(path: Path | str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Read what :func:`save_arrays` wrote; a FairforgetError names a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FairforgetError(f"localization arrays not found: {path}")
    try:
        data = np.load(path)
        means: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        counts = {}
        for key in data.files:
            group, name = key.rsplit("::", 1)
            if name == "n":
                counts[group] = int(data[key])
            else:
                means[group][name] = data[key]
    except (OSError, ValueError) as exc:
        raise FairforgetError(f"localization arrays {path} are malformed: {exc}") from exc
    return dict(means), counts


def plot_heads(path: Path | str, stats: dict[str, np.ndarray], title: str) -> None:
    """Layer x head heatmaps of the head statistics of one group."""
    fig, axes = new_figure(1, len(HEAD_STATS), figsize=(3.0 * len(HEAD_STATS), 6.0), sharey=True)
    for ax, name in zip(axes, HEAD_STATS):
        layer_head_panel(fig, ax, stats[name], name)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    save_figure(fig, path)


def plot_groups(path: Path | str, means: dict[str, dict[str, np.ndarray]], groups: Sequence[str], title: str) -> None:
    """Layer x group heatmaps: residual and MLP norms at the last position, context and question attention mass."""
    panels = {"hidden_norm_last": lambda s: s["hidden_norm_last"], "mlp_norm_last": lambda s: s["mlp_norm_last"],
              "attn_context_last (head mean)": lambda s: s["attn_context_last"].mean(1),
              "attn_question_last (head mean)": lambda s: s["attn_question_last"].mean(1)}
    fig, axes = new_figure(1, len(panels), figsize=(4.0 * len(panels), 6.0), sharey=True)
    for ax, (name, get) in zip(axes, panels.items()):
        matrix = np.stack([get(means[g]) for g in groups], axis=1)
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.05)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    save_figure(fig, path)


def bbq_prompts(examples: Sequence[Any], chat_tokenizer: Any = None, seed: int = 0,
                answer_types: dict[tuple[str, int], str] | None = None) -> list[LocalizationPrompt]:
    """BBQ evaluation prompts (same option order as the evaluation), grouped as all / category /
    category|condition, and with ``answer_types`` ((category, example_id) -> the model's answer type in the
    chosen scoring mode) also ``answer|<type>`` and ``<condition>|answer|<type>``."""
    def groups(e: Any) -> tuple[str, ...]:
        base = ("all", e.category, f"{e.category}|{e.context_condition}")
        kind = (answer_types or {}).get((e.category, e.example_id))
        return base + ((f"answer|{kind}", f"{e.context_condition}|answer|{kind}") if kind else ())

    return [LocalizationPrompt(build_prompt(e, option_order(e, seed), True, chat_tokenizer), e.context, e.question,
                               groups(e)) for e in examples]


def plot_difference(path: Path | str, before: dict[str, np.ndarray], after: dict[str, np.ndarray], title: str) -> None:
    """Layer x head heatmaps of after - before for each head statistic (diverging colours centred on 0)."""
    fig, axes = new_figure(1, len(HEAD_STATS), figsize=(3.0 * len(HEAD_STATS), 6.0), sharey=True)
    for ax, name in zip(axes, HEAD_STATS):
        diff = after[name] - before[name]
        bound = float(np.abs(diff).max()) or 1.0
        layer_head_panel(fig, ax, diff, f"{name}\nafter - before", "RdBu_r", -bound, bound)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    save_figure(fig, path)


def run_localization(model: Any, tokenizer: Any, examples: Sequence[Any], folder: Path | str, label: str,
                     chat_tokenizer: Any = None, seed: int = 0, batch_size: int = 8,
                     provenance: dict | None = None, compare_to: Path | str | None = None,
                     answer_types: dict[tuple[str, int], str] | None = None) -> dict:
    """Localize BBQ ``examples`` and write a run folder: ``arrays.npz`` (means per group), ``summary.json``
    (with ``provenance``), ``per_group.csv``, ``items.jsonl``, heatmaps, and with ``compare_to`` (an earlier
    folder) ``difference_heads.png``. The model is switched to eager attention. Returns the summary."""
    import time

    folder = Path(folder)
    use_eager_attention(model)
    prompts = bbq_prompts(examples, chat_tokenizer, seed, answer_types)
    start = time.time()
    aggregate = localize(model, tokenizer, prompts, batch_size)
    seconds = time.time() - start
    means, counts = aggregate.means(), dict(aggregate.counts)
    save_arrays(folder / "arrays.npz", means, counts)
    write_csv(folder / "per_group.csv", summary_rows(means, counts))
    write_jsonl(folder / "items.jsonl", [
        {"category": e.category, "example_id": e.example_id, "context_condition": e.context_condition,
         "question_polarity": e.question_polarity, "n_tokens": len(r),
         "n_context_tokens": int((r == REGION_CONTEXT).sum()), "n_question_tokens": int((r == REGION_QUESTION).sum())}
        for e, r in zip(examples, (token_regions(tokenizer, p.text, p.context, p.question) for p in prompts))])
    plot_heads(folder / "heads_all.png", means["all"], f"{label}: per-head statistics, all {counts['all']} prompts")
    categories = sorted({e.category for e in examples})
    plot_groups(folder / "layers_by_category.png", means, categories, f"{label}: per-layer statistics by category")
    summary = {"label": label, "n_prompts": len(prompts), "wall_seconds": round(seconds, 1),
               "statistics": {"layer": list(LAYER_STATS), "head": list(HEAD_STATS)},
               "groups": group_summary(means, counts)}
    if compare_to is not None and (Path(compare_to) / "arrays.npz").is_file():
        summary["compared_to"] = str(compare_to)
        summary["comparison"] = _compare(Path(compare_to), folder, examples, means, label)
    summary["provenance"] = provenance
    write_json(folder / "summary.json", summary)
    return summary


def _compare(before_dir: Path, folder: Path, examples: Sequence[Any], means: dict, label: str) -> str:
    """Plot after - before when the earlier run localized the same prompts; say what was done."""
    import json

    items_path = before_dir / "items.jsonl"
    before_keys = ({(r["category"], r["example_id"]) for r in map(json.loads, items_path.read_text().splitlines())}
                   if items_path.is_file() else set())
    if before_keys != {(e.category, e.example_id) for e in examples}:
        return "skipped: the earlier run localized a different sample of prompts"
    before, _ = load_arrays(before_dir / "arrays.npz")
    if before["all"]["head_norm_last"].shape != means["all"]["head_norm_last"].shape:
        return "skipped: the earlier run has a different number of layers or heads"
    plot_difference(folder / "difference_heads.png", before["all"], means["all"], f"{label} vs {before_dir}")
    return "difference_heads.png: after - before on the same prompts"
