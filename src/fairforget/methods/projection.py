"""Projection methods on the final hidden state, folded into the LM head: SentenceDebias, INLP and LEACE.

A causal LM's logits are ``W h`` with ``h`` the final hidden state (after the last norm), so a linear map
``h -> P h`` applied at every token position is the same model with the head ``W' = W P``. The result is an
ordinary Hugging Face folder; a model that ties its head to the input embeddings is untied first (the
embeddings keep their values) and its config says so (``tie_word_embeddings: false`` and
``fairforget_projection``).

* SentenceDebias (Liang et al. 2020, as in bias-bench): the top-k right singular vectors of the matrix of
  male-minus-female sentence representations (bias-bench's PCA of the pair-centred representations is this
  SVD) are projected out: ``P = I - V_k^T V_k``; k is the strength.
* INLP (Ravfogel et al. 2020): a logistic-regression probe predicts gender from the (already projected)
  representations; its direction joins the removed subspace and the next probe is fitted on the new
  projection. ``P = I - Q Q^T`` for an orthonormal basis Q of the first n directions; n is the strength.
* LEACE (Belrose et al. 2023), by the ``concept-erasure`` package: ``P = I - alpha L R`` from its eraser;
  alpha in [0, 1] is the strength. The eraser is the package's linear one (``affine=False``): Llama and GPT-2
  heads have no bias, so LEACE's mean-restoring term ``L R mu`` could not be saved in an ordinary folder.
  The guarantee, zero cross-covariance between the erased representation and the label, does not depend on
  that constant.

Fitting data are gender-swapped sentence pairs (:func:`fitting_pairs`: WinoBias dev and WinoGender), never
StereoSet or CrowS-Pairs. A representation is taken at every token position from the first token where the
two sentences of a pair differ (earlier positions cannot see the gendered word: they are the same in both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from concept_erasure import LeaceFitter
from scipy.linalg import orth

from fairforget.errors import FairforgetError
from fairforget.methods.registry import Knob, MethodSpec, register_method
from fairforget.progress import progress
from fairforget.scoring import (Encoded, backbone_and_head, collate, conditioning_token_id, hidden_states,
                                length_sorted_batches)
from fairforget.winogender import Pair, load_winobias_pairs, load_winogender_pairs

METHODS = ("sentence_debias", "inlp", "leace")
STRENGTH_NAMES = {"sentence_debias": "k", "inlp": "iterations", "leace": "alpha"}
DEFAULT_STRENGTHS = {"sentence_debias": [1.0, 2.0, 4.0], "inlp": [5.0, 10.0, 20.0], "leace": [0.25, 0.5, 1.0]}
CONFIG_KEY = "fairforget_projection"


@dataclass(frozen=True)
class GenderedPair:
    """Two sentences that differ only in gendered words, and where the pair came from."""

    male: str
    female: str
    source: str


@dataclass(frozen=True)
class Representations:
    """Final hidden states of the fitting pairs: token rows with labels (1 = male) and per-pair mean differences."""

    tokens: torch.Tensor  # [n_tokens, hidden]
    labels: torch.Tensor  # [n_tokens], 1.0 male, 0.0 female
    differences: torch.Tensor  # [n_pairs, hidden], mean male representation minus mean female one


def fitting_files(winobias_dir: Path | None, winogender_dir: Path | None) -> list[Path]:
    """The files :func:`fitting_pairs` reads from the two folders (a folder given as None is left out)."""
    files = sorted(Path(winobias_dir).glob("*_stereotyped_type?.txt.dev")) if winobias_dir is not None else []
    if winogender_dir is not None:
        files += [Path(winogender_dir) / "all_sentences.tsv", Path(winogender_dir) / "occupations-stats.tsv"]
    return files


def fitting_pairs(winobias_dir: Path | str | None, winogender_dir: Path | str | None) -> list[GenderedPair]:
    """(male, female) sentence pairs from WinoBias dev (pro/anti sentences differ in the pronoun's gender) and
    WinoGender (the male and female sentence of each template); a folder given as None is left out."""
    pairs = []
    if winobias_dir is not None:
        for pair in load_winobias_pairs(winobias_dir, "dev"):
            if pair.adv_gender in ("male", "female"):
                pairs.append(_oriented(pair, "winobias-dev"))
    if winogender_dir is not None:
        folder = Path(winogender_dir)
        for pair in load_winogender_pairs(folder / "all_sentences.tsv", folder / "occupations-stats.tsv"):
            pairs.append(_oriented(pair, "winogender"))
    if not pairs:
        raise FairforgetError("no fitting pairs: give --winobias-dir and/or --winogender-dir")
    return pairs


def _oriented(pair: Pair, source: str) -> GenderedPair:
    male, female = ((pair.advantaged, pair.disadvantaged) if pair.adv_gender == "male"
                    else (pair.disadvantaged, pair.advantaged))
    return GenderedPair(male, female, source)


def pair_token_ids(tokenizer: Any, pair: GenderedPair) -> tuple[list[int], list[int], int]:
    """Both sentences' ids after the conditioning token, and the first position where they differ."""
    start = [conditioning_token_id(tokenizer)]
    male = start + tokenizer(pair.male, add_special_tokens=False)["input_ids"]
    female = start + tokenizer(pair.female, add_special_tokens=False)["input_ids"]
    first = next((i for i, (a, b) in enumerate(zip(male, female)) if a != b), min(len(male), len(female)))
    return male, female, first


def extract(model: Any, tokenizer: Any, pairs: Sequence[GenderedPair], batch_size: int = 32) -> Representations:
    """The final hidden state at every position from each pair's first difference on (see the module doc)."""
    encoded, labels = [], []
    for index, pair in enumerate(pairs):
        male, female, first = pair_token_ids(tokenizer, pair)
        if first >= min(len(male), len(female)):
            raise FairforgetError(f"fitting pair {index} ({pair.source}) has no differing token: {pair.male!r}")
        encoded += [Encoded(tuple(male), first), Encoded(tuple(female), first)]
        labels += [1.0, 0.0]
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    with torch.inference_mode():
        batches = length_sorted_batches([len(e.ids) for e in encoded], batch_size)
        for batch in progress(batches, desc="final hidden states", unit="batch"):
            inputs = collate([encoded[i] for i in batch], tokenizer.pad_token_id, device)
            hidden = hidden_states(model, inputs["input_ids"], inputs["attention_mask"]).float()
            for row, i in enumerate(batch):
                rows[i] = hidden[row][inputs["target_mask"][row]].cpu()
    sizes = torch.tensor([len(r) for r in rows])
    means = torch.stack([r.mean(dim=0) for r in rows])
    return Representations(torch.cat(rows), torch.tensor(labels).repeat_interleave(sizes), means[0::2] - means[1::2])


def sentence_debias_directions(differences: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` right singular vectors (rows, unit norm) of the male-minus-female difference matrix."""
    _, _, vh = torch.linalg.svd(differences.double(), full_matrices=False)
    return vh[:k]


def orthogonal_complement(directions: torch.Tensor, dim: int) -> torch.Tensor:
    """``I - B B^T``, B an orthonormal basis of the span of ``directions`` (rows; ``scipy.linalg.orth``, so a
    repeated direction is removed once): the orthogonal projection off that span; none: exactly I."""
    eye = torch.eye(dim, dtype=torch.float64)
    if len(directions) == 0:
        return eye
    basis = torch.from_numpy(orth(directions.double().T.numpy()))
    return eye - basis @ basis.T


def logistic_direction(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 100) -> torch.Tensor:
    """The unit weight vector of an L2-regularised logistic regression of ``y`` (0/1) on ``x`` (with intercept)."""
    x = x.double()
    weight = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    optimizer = torch.optim.LBFGS([weight], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(design @ weight, y.double()) \
            + l2 * weight[:-1].square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    direction = weight.detach()[:-1]
    return direction / direction.norm()


def inlp_directions(x: torch.Tensor, y: torch.Tensor, iterations: int, l2: float = 1e-3) -> torch.Tensor:
    """INLP's removed directions, in the order found: each probe is fitted on ``x`` projected off the earlier ones."""
    directions = torch.zeros(0, x.shape[1], dtype=torch.float64)
    for _ in progress(range(iterations), desc="INLP probes", unit="probe"):
        projected = x.double() @ orthogonal_complement(directions, x.shape[1])
        directions = torch.cat([directions, logistic_direction(projected, y, l2)[None]])
    return directions


def leace_eraser(x: torch.Tensor, y: torch.Tensor) -> Any:
    """The ``concept-erasure`` LEACE eraser of the 0/1 label ``y`` from ``x`` (linear: ``affine=False``)."""
    return LeaceFitter.fit(x.double(), y.double()[:, None], affine=False).eraser


def leace_projection(eraser: Any, alpha: float) -> torch.Tensor:
    """``I - alpha L R``: the eraser's projection blended with the identity (alpha = 0: exactly I)."""
    eye = torch.eye(eraser.proj_left.shape[0], dtype=torch.float64)
    return eye - alpha * (eraser.proj_left @ eraser.proj_right).double() if alpha else eye


def fit(method: str, reps: Representations, max_strength: float, l2: float = 1e-3) -> Callable[[float], torch.Tensor]:
    """Fit ``method`` once (up to ``max_strength``); returns strength -> P (strength 0: exactly the identity)."""
    dim = reps.tokens.shape[1]
    if method == "sentence_debias":
        directions = sentence_debias_directions(reps.differences, int(max_strength))
        return lambda k: orthogonal_complement(directions[: int(k)], dim)
    if method == "inlp":
        directions = inlp_directions(reps.tokens, reps.labels, int(max_strength), l2)
        return lambda n: orthogonal_complement(directions[: int(n)], dim)
    if method == "leace":
        eraser = leace_eraser(reps.tokens, reps.labels)
        return lambda alpha: leace_projection(eraser, alpha)
    raise FairforgetError(f"unknown projection method {method!r}; known: {', '.join(METHODS)}")


def untie_head(model: Any) -> tuple[torch.Tensor, bool]:
    """Give ``model`` an LM head of its own (a copy where it shares the input embeddings; config updated).
    Returns the start head weight (a copy) and whether the model was tied."""
    _, head = backbone_and_head(model)
    tied = head.weight is model.get_input_embeddings().weight
    start = head.weight.detach().clone()
    if tied:
        head.weight = torch.nn.Parameter(start.clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    return start, tied


def fold(model: Any, start_weight: torch.Tensor, projection: torch.Tensor) -> Any:
    """Set the (untied) LM head of ``model`` to ``W P`` in place: the projection of every final hidden state."""
    _, head = backbone_and_head(model)
    if head.weight is model.get_input_embeddings().weight:
        raise FairforgetError("the LM head shares the input embeddings: call untie_head first")
    with torch.no_grad():
        head.weight.copy_((start_weight.double() @ projection).to(head.weight.dtype))
    return model


def record_in_config(model: Any, method: str, strength: float, tied: bool, **details: Any) -> None:
    """Say in the saved config which projection the head carries and that the head was untied."""
    setattr(model.config, CONFIG_KEY, {"method": method, "strength": strength, "untied_lm_head": tied,
                                       "folded_into": "lm_head.weight = W P", **details})


@dataclass(frozen=True)
class ProjectionConfig:
    """A projection method's settings (stage 36), saved next to the folded model."""

    method: str
    model: str
    strengths: list
    fit_limit: int | None
    inlp_l2: float
    selection_metric: str
    selection_limit: int | None
    max_lms_drop: float | None
    max_ppl_increase: float | None
    selection_ppl_texts: int
    half_seed: int
    seed: int


def _register(name: str, title: str) -> None:
    register_method(MethodSpec(
        name=name, title=title, script="36_projection.py", config=ProjectionConfig,
        knobs=(Knob("strengths", f"{STRENGTH_NAMES[name]}, chosen on the selection half"),),
        zero_flags={"strengths": [0.0]}, sizes={"fit_limit": 150, "selection_limit": 120}, saves_settings=True,
        inputs=lambda layout: [*fitting_files(layout.winobias, layout.data / "winogender" / "data"),
                               layout.stereoset],
        data_flags=lambda layout: {"method": name, "winobias_dir": layout.winobias,
                                   "winogender_dir": layout.data / "winogender" / "data",
                                   "stereoset": layout.stereoset}))


_register("sentence_debias", "SentenceDebias (Liang et al. 2020), folded into the LM head")
_register("inlp", "INLP (Ravfogel et al. 2020), folded into the LM head")
_register("leace", "LEACE (Belrose et al. 2023, concept-erasure), folded into the LM head")
