"""Per-sample scores to tail-risk metrics with prompt-clustered bootstrap confidence intervals.

Dimension legend: N samples (all prompts together), P distinct prompts, B bootstrap replicates.

Pure NumPy. Every metric is computed by one vectorised function of per-prompt multiplicities
`W [B, P]` (how often each prompt is in a replicate): the point estimate is the row `W = 1`, a
bootstrap replicate is a row of counts of P prompts drawn with replacement. Resampling prompts,
not samples, is the cluster bootstrap: the N samples of one prompt are correlated (same prompt,
same policy), so resampling them one by one would understate the variance of every metric.

Metrics (see `point_metrics`):
    reward_mean, cost_mean       sample means
    catastrophic_rate            fraction of samples flagged catastrophic
    prompts_with_catastrophe     fraction of prompts with at least one catastrophic sample
    cost_cvar_<a>                CVaR_a of the sample cost distribution (upper tail), per level a
    worst_prompt_cost            max over prompts of the prompt's mean cost
    kl                           mean log pi(y|x) - log pi_ref(y|x): a Monte Carlo estimate of
                                 KL(pi || pi_ref), the samples being drawn from pi (only when
                                 `logratio` is given)

CVaR (Rockafellar-Uryasev). With F the (weighted) empirical distribution function of the cost,

    VaR_a  = inf {c : F(c) >= a}                       (the lower a-quantile)
    CVaR_a = VaR_a + E[(C - VaR_a)_+] / (1 - a)

which is the mean of the worst (1 - a) probability mass of the cost, an atom at VaR_a counted
only for the part of its mass that falls in the tail. For n equally weighted samples and
m = (1 - a) n it is (sum of the floor(m) largest costs + (m - floor(m)) * the next one) / m.
The formula is minimised by every point of the a-quantile interval, so the value does not depend
on how a float comparison breaks a tie at F(c) = a.
Reference: Rockafellar and Uryasev, "Conditional value-at-risk for general loss distributions"
(J. Banking & Finance, 2002), Proposition 8.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

DEFAULT_LEVELS = (0.9, 0.99)

# A [N, b] block of per-sample bootstrap weights holds at most this many entries (16 MB as int32).
_BLOCK_ENTRIES = 1 << 22


class Estimate(NamedTuple):
    """A point estimate and its confidence interval [low, high]."""

    value: float
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class SampleScores:
    """Scores of N sampled responses, one entry per sample (all arrays [N]).

    Attributes:
      prompt: [N] int, index of the held-out prompt the sample answers (any integers; samples with
        equal values belong to one prompt, and prompts may have unequal numbers of samples).
      reward: [N] float, the reward (helpfulness) score.
      cost: [N] float, the cost (harm) score; higher is worse.
      catastrophic: [N] bool, whether the sample is a catastrophic failure.
      logratio: [N] float or None, log pi(y|x) - log pi_ref(y|x) summed over the response tokens.

    Arrays are converted on construction; a length mismatch, a non-finite value or a wrong dtype
    raises ValueError naming the field.
    """

    prompt: np.ndarray
    reward: np.ndarray
    cost: np.ndarray
    catastrophic: np.ndarray
    logratio: np.ndarray | None = None

    def __post_init__(self):
        prompt = np.asarray(self.prompt)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(
                f"SampleScores.prompt must be a non-empty 1-D array, got {prompt.shape}"
            )
        if prompt.dtype.kind not in "iu":
            raise ValueError(f"SampleScores.prompt must hold integers, got dtype {prompt.dtype}")
        object.__setattr__(self, "prompt", prompt.astype(np.int64))
        n = prompt.shape[0]
        for name in ("reward", "cost", "logratio"):
            value = getattr(self, name)
            if value is None and name == "logratio":
                continue
            array = np.asarray(value)
            if array.dtype.kind not in "iuf":
                raise ValueError(f"SampleScores.{name} must be numeric, got dtype {array.dtype}")
            array = array.astype(np.float64)
            _check_length(name, array, n)
            bad = ~np.isfinite(array)
            if bad.any():
                first = int(np.argmax(bad))
                raise ValueError(
                    f"SampleScores.{name} has {int(bad.sum())} non-finite value(s) "
                    f"(NaN or inf), the first at sample {first}: {array[first]}"
                )
            object.__setattr__(self, name, array)
        catastrophic = np.asarray(self.catastrophic)
        if catastrophic.dtype != np.bool_:
            raise ValueError(
                f"SampleScores.catastrophic must be a bool array, got dtype {catastrophic.dtype}"
            )
        _check_length("catastrophic", catastrophic, n)
        object.__setattr__(self, "catastrophic", catastrophic)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    @property
    def num_prompts(self) -> int:
        return int(np.unique(self.prompt).size)


def _check_length(name: str, array: np.ndarray, n: int) -> None:
    if array.shape != (n,):
        raise ValueError(
            f"SampleScores.{name} has shape {array.shape}, expected ({n},) like SampleScores.prompt"
        )


def metric_names(levels=DEFAULT_LEVELS, *, with_kl: bool = True) -> list[str]:
    """The metric names in report order (`cost_cvar_<level>` uses `format(level, 'g')`)."""
    names = ["reward_mean", "cost_mean", "catastrophic_rate", "prompts_with_catastrophe"]
    names += [f"cost_cvar_{level:g}" for level in levels]
    names += ["worst_prompt_cost"]
    return names + (["kl"] if with_kl else [])


def point_metrics(scores: SampleScores, *, levels=DEFAULT_LEVELS) -> dict[str, float]:
    """The metrics of `scores` (module docstring), without confidence intervals.

    Args:
      scores: N samples over P prompts.
      levels: CVaR levels a in (0, 1); one `cost_cvar_<a>` metric each.

    Returns:
      {name: float}; `kl` only when `scores.logratio` is not None.

    Example:
      >>> s = SampleScores(prompt=[0, 0, 1], reward=[1., 2., 3.], cost=[0., 4., 1.],
      ...                  catastrophic=np.array([False, True, False]))
      >>> point_metrics(s, levels=(0.5,))["cost_cvar_0.5"]   # worst 1.5 samples: (4 + 0.5*1)/1.5
      3.0
    """
    stats = _Stats(scores, levels)
    values = stats.evaluate(np.ones((1, stats.num_prompts), np.int64))
    return {name: float(v[0]) for name, v in values.items()}


def bootstrap_metrics(
    scores: SampleScores, *, n_boot: int = 1000, seed: int = 0, levels=DEFAULT_LEVELS
) -> dict[str, np.ndarray]:
    """Cluster-bootstrap replicates of every metric: P prompts drawn with replacement, B times.

    The draws are `np.random.default_rng(seed).integers(0, P, size=(n_boot, P))`, indices into the
    sorted distinct values of `scores.prompt`; every sample of a drawn prompt enters the replicate
    (as often as the prompt is drawn). With one prompt every replicate equals the point estimate.

    Args:
      scores: N samples over P prompts.
      n_boot: B, the number of replicates.
      seed: seed of the NumPy generator.
      levels: CVaR levels.

    Returns:
      {name: [B] float64}.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    stats = _Stats(scores, levels)
    num_prompts = stats.num_prompts
    draws = np.random.default_rng(seed).integers(0, num_prompts, size=(n_boot, num_prompts))
    # Counts of each prompt per replicate, [B, P], by one bincount over row-offset indices.
    offsets = draws + num_prompts * np.arange(n_boot)[:, None]
    counts = np.bincount(offsets.ravel(), minlength=n_boot * num_prompts)
    return stats.evaluate(counts.reshape(n_boot, num_prompts))


def tail_metrics(
    scores: SampleScores,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    levels=DEFAULT_LEVELS,
    confidence: float = 0.95,
) -> dict[str, Estimate]:
    """Every metric with a percentile cluster-bootstrap confidence interval.

    `value` is the estimate on the full sample; `low`/`high` are the (1 -+ confidence)/2
    percentiles of `bootstrap_metrics` (prompts resampled with replacement, see there).

    Args:
      scores: N samples over P prompts.
      n_boot: B bootstrap replicates.
      seed: bootstrap seed; the same seed gives the same intervals.
      levels: CVaR levels a in (0, 1).
      confidence: coverage of the interval.

    Returns:
      {name: Estimate(value, low, high)} in `metric_names` order; `kl` only with a logratio.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    point = point_metrics(scores, levels=levels)
    replicates = bootstrap_metrics(scores, n_boot=n_boot, seed=seed, levels=levels)
    tail = 100.0 * (1.0 - confidence) / 2.0
    out = {}
    for name, value in point.items():
        low, high = np.percentile(replicates[name], [tail, 100.0 - tail])
        out[name] = Estimate(value, float(low), float(high))
    return out


class _Stats:
    """Per-prompt sufficient statistics of `scores`; `evaluate(W [B, P])` gives every metric."""

    def __init__(self, scores: SampleScores, levels):
        levels = tuple(float(a) for a in levels)
        for level in levels:
            if not 0.0 < level < 1.0:
                raise ValueError(f"CVaR levels must be in (0, 1), got {level}")
        self.levels = levels
        # prompt_of[i] in [0, P): the sample's prompt among the sorted distinct prompt values.
        _, prompt_of = np.unique(scores.prompt, return_inverse=True)
        num_prompts = int(prompt_of.max()) + 1
        self.num_prompts = num_prompts

        def per_prompt(x):  # [N] -> [P] sums
            return np.bincount(prompt_of, weights=x, minlength=num_prompts)

        self.count = per_prompt(None)
        self.reward_sum = per_prompt(scores.reward)
        self.cost_sum = per_prompt(scores.cost)
        self.catastrophic_sum = per_prompt(scores.catastrophic.astype(np.float64))
        self.any_catastrophic = (self.catastrophic_sum > 0).astype(np.float64)
        self.prompt_mean_cost = self.cost_sum / self.count
        self.logratio_sum = None if scores.logratio is None else per_prompt(scores.logratio)
        order = np.argsort(scores.cost, kind="stable")
        self.sorted_cost = scores.cost[order]  # [N] ascending
        self.sorted_prompt = prompt_of[order]  # [N]

    def evaluate(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics under prompt multiplicities `weights` [B, P] (int) -> {name: [B]}."""
        weights_f = weights.astype(np.float64)
        num_samples = weights_f @ self.count  # [B] samples in each replicate
        out = {
            "reward_mean": weights_f @ self.reward_sum / num_samples,
            "cost_mean": weights_f @ self.cost_sum / num_samples,
            "catastrophic_rate": weights_f @ self.catastrophic_sum / num_samples,
            "prompts_with_catastrophe": weights_f @ self.any_catastrophic / weights_f.sum(1),
        }
        cvars = self._cvar(weights)
        for level, cvar in zip(self.levels, cvars, strict=True):
            out[f"cost_cvar_{level:g}"] = cvar
        drawn_means = np.where(weights > 0, self.prompt_mean_cost, -np.inf)  # [B, P]
        out["worst_prompt_cost"] = drawn_means.max(axis=1)
        if self.logratio_sum is not None:
            out["kl"] = weights_f @ self.logratio_sum / num_samples
        return out

    def _cvar(self, weights: np.ndarray) -> list[np.ndarray]:
        """Rockafellar-Uryasev CVaR of the weighted sample costs, per level -> [B] each.

        Sample-major blocks ([N, b]): gathering rows of `weights.T` and a cumulative sum down the
        rows are contiguous, and only the rows above the smallest VaR index enter the excess.
        """
        num_boot = weights.shape[0]
        num_samples = self.sorted_cost.shape[0]
        # Cumulative weights are integers up to P * max count; int32 halves the memory traffic.
        max_total = self.num_prompts * int(self.count.max())
        dtype = np.int32 if max_total < np.iinfo(np.int32).max else np.int64
        weights_t = np.ascontiguousarray(weights.T, dtype=dtype)  # [P, B]
        block = max(1, _BLOCK_ENTRIES // num_samples)
        results = [np.empty(num_boot) for _ in self.levels]
        for start in range(0, num_boot, block):
            cumulative = weights_t[self.sorted_prompt, start : start + block]  # [N, b] weights
            np.cumsum(cumulative, axis=0, out=cumulative)  # [N, b] cumulative, exact
            total = cumulative[-1].astype(np.float64)  # [b]
            for level, result in zip(self.levels, results, strict=True):
                # Number of sorted samples with F < a = index of the lower a-quantile.
                var_index = np.sum(cumulative < level * total, axis=0)  # [b]
                var = self.sorted_cost[var_index]  # [b]
                # Rows at or below the smallest VaR index have cost <= VaR: no excess.
                first = int(var_index.min())
                tail_cumulative = cumulative[first:]  # [N - first, b]
                tail_weight = np.diff(tail_cumulative, axis=0)  # [N - first - 1, b], rows first+1..
                excess = np.maximum(self.sorted_cost[first + 1 :, None] - var, 0.0)
                expected_excess = np.einsum("nb,nb->b", tail_weight.astype(np.float64), excess)
                result[start : start + block] = var + expected_excess / total / (1.0 - level)
        return results
