"""Per-set and per-category metrics of one model's samples on the shipped prompt sets, and the
extra columns of their samples.jsonl rows.

Dimension legend: N samples, P prompts.

Row names: "<source>" for every prompt of a set ("harmbench", "benign") and
"<source>/<category>" for each category ("harmbench/illegal", "benign/lookalike"); each row
is `tail_metrics` over that subset's samples, with its prompts resampled in the bootstrap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rsa_jax.eval.metrics import Estimate, SampleScores, tail_metrics
from rsa_jax.eval.prompt_sets import PromptItem


def subset_scores(scores: SampleScores, keep: np.ndarray) -> SampleScores:
    """The samples where `keep` [N] is True."""
    return SampleScores(
        prompt=scores.prompt[keep],
        reward=scores.reward[keep],
        cost=scores.cost[keep],
        catastrophic=scores.catastrophic[keep],
        logratio=None if scores.logratio is None else scores.logratio[keep],
    )


def category_metrics(
    scores: SampleScores,
    items: Sequence[PromptItem],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Estimate]], dict[str, SampleScores]]:
    """({row name: metrics}, {row name: its samples}) for every set and category present.

    Args:
      scores: N samples; `scores.prompt` indexes `items`.
      items: the P prompts.
    """
    source = np.array([items[p].source for p in scores.prompt])
    category = np.array([f"{items[p].source}/{items[p].category}" for p in scores.prompt])
    rows: dict[str, dict[str, Estimate]] = {}
    samples: dict[str, SampleScores] = {}
    for names in (source, category):
        for name in dict.fromkeys(names.tolist()):
            part = subset_scores(scores, names == name)
            samples[name] = part
            rows[name] = tail_metrics(part, n_boot=n_boot, seed=seed)
    return rows, samples


def annotate(
    rows: list[dict],
    items: Sequence[PromptItem],
    extras: Mapping[str, Any] | None = None,
) -> list[dict]:
    """samples.jsonl rows with each prompt's `prompt_id`, `source`, `category`, `harmful`, and
    the judges' own per-sample columns (`extras`: name -> [N] array, e.g. "refusal/refused")."""
    extras = extras or {}
    for r, row in enumerate(rows):
        item = items[row["prompt_index"]]
        row.update(
            prompt_id=item.id, source=item.source, category=item.category, harmful=item.harmful
        )
        for name, values in extras.items():
            value = np.asarray(values)[r]
            row[name] = value.item() if hasattr(value, "item") else value
    return rows


class RecordingScorer:
    """Passes calls to a scorer and keeps its last output's extra per-sample columns (all but
    reward, cost and catastrophic), for samples.jsonl."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.extras: dict[str, np.ndarray] = {}
        threshold = getattr(scorer, "catastrophe_threshold", None)
        if threshold is not None:
            self.catastrophe_threshold = threshold

    def __call__(self, prompts: list[str], responses: list[str]):
        out = self.scorer(prompts, responses)
        self.extras = {
            key: np.asarray(value)
            for key, value in out.items()
            if key not in ("reward", "cost", "catastrophic")
            and np.ndim(value) == 1
            and len(value) == len(responses)
        }
        return out
