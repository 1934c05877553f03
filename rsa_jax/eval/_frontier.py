"""Reward-cost Pareto frontiers, the reward gap at equal cost, and Algorithm 1's constrained
choice.

Dimension legend: K points (a method's variants), F frontier points, M query costs, S seeds.

A method is compared through a family of variants (beta_2 values, merge ratios, ...), each one
point (c, r): a cost statistic c (lower is better: `cost_mean`, `catastrophic_rate`,
`cost_cvar_0.99`, or `kl`) and a reward r (higher is better: `reward_mean`).

Pareto frontier. Point i is dominated when some j has c_j <= c_i and r_j >= r_i with at least
one strict; the frontier is the set of points nobody dominates. Sorted by cost, distinct frontier
points have strictly increasing cost AND strictly increasing reward (equal cost or equal reward
would make one dominate the other); exact duplicates dominate neither and are all kept.

Interpolation. Along the frontier the reward is the piecewise-linear function R(c) through the
frontier points on [c_min, c_max] and undefined outside: no variant is that cheap (below), and
beyond the most expensive one the family says nothing (above). For mean statistics (mean cost,
catastrophic rate) a point on a segment is what a random mixture of the two neighbouring variants
achieves in expectation; for CVaR and KL it is a plain interpolation.

The reward gap of methods A and B at equal cost is the mean of R_A(c) - R_B(c) over the
overlapping cost range [lo, hi] = [max(cmin_A, cmin_B), min(cmax_A, cmax_B)]:

    gap = 1 / (hi - lo) * integral_lo^hi (R_A(c) - R_B(c)) dc      (hi > lo)
    gap = R_A(lo) - R_B(lo)                                         (hi = lo)

undefined when the ranges do not overlap. Both functions are linear between the union of their
breakpoints, so the trapezoid rule over those breakpoints is exact. Across seeds, the per-seed
gaps d_1..d_S give mean(d) -+ t_{0.975, S-1} sd(d) / sqrt(S) (a paired comparison: both methods
of one seed share the SFT model and the preference pairs).

Algorithm 1's choice (RSA paper, the safety stage under a cost constraint E[C] <= zeta, here any
statistic): with a constraint `statistic <= threshold`, a method's safe set is the variants whose
UPPER confidence bound of the statistic meets the threshold, and its constrained optimum is the
safe variant of highest reward (ties: lower statistic, then name). The safe set may be empty.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from rsa_jax.eval.metrics import Estimate

# The cost statistics of the frontier plots, in report order (`kl` is the distance from the
# reference; all are lower-is-better).
FRONTIER_STATISTICS = ("cost_mean", "catastrophic_rate", "cost_cvar_0.99", "kl")
REWARD = "reward_mean"


@dataclasses.dataclass(frozen=True)
class Frontier:
    """The Pareto frontier of one method's variants for one cost statistic.

    Attributes:
      names: [F] the frontier variants, by increasing cost (exact duplicates all kept).
      cost: [F] their cost statistic, each an Estimate (value and confidence interval).
      reward: [F] their reward, each an Estimate.
      dominated: the names of the variants not on the frontier.
    """

    names: tuple[str, ...]
    cost: tuple[Estimate, ...]
    reward: tuple[Estimate, ...]
    dominated: tuple[str, ...] = ()

    @property
    def cost_values(self) -> np.ndarray:
        return np.array([e.value for e in self.cost], np.float64)

    @property
    def reward_values(self) -> np.ndarray:
        return np.array([e.value for e in self.reward], np.float64)

    @property
    def cost_range(self) -> tuple[float, float]:
        c = self.cost_values
        return float(c[0]), float(c[-1])


def pareto_indices(cost, reward) -> np.ndarray:
    """Indices of the non-dominated points, by increasing cost (module docstring).

    Args:
      cost: [K] cost statistic per point (lower is better).
      reward: [K] reward per point (higher is better).

    Returns:
      [F] int indices into the K points, cost ascending; exact duplicates of a frontier point are
      all included, in input order.

    Example:
      >>> pareto_indices([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 2.5]).tolist()  # (2, 3) dominates
      [0, 1]
    """
    cost = np.asarray(cost, np.float64)
    reward = np.asarray(reward, np.float64)
    if cost.ndim != 1 or cost.shape != reward.shape:
        raise ValueError(f"pareto_indices: cost {cost.shape} and reward {reward.shape} must be [K]")
    if not (np.isfinite(cost).all() and np.isfinite(reward).all()):
        raise ValueError("pareto_indices: costs and rewards must be finite")
    # Cost ascending, then reward descending, then input order: a point is on the frontier iff
    # its reward beats every cheaper-or-equal point seen before it, or it repeats the last kept.
    order = np.lexsort((np.arange(cost.size), -reward, cost))
    kept: list[int] = []
    best = -math.inf
    for i in order:
        if reward[i] > best:
            kept.append(int(i))
            best = reward[i]
        elif kept and cost[i] == cost[kept[-1]] and reward[i] == reward[kept[-1]]:
            kept.append(int(i))
    return np.array(kept, np.int64)


def pareto_frontier(
    variants: Mapping[str, Mapping[str, Estimate]], statistic: str, *, reward: str = REWARD
) -> Frontier | None:
    """The frontier of `reward` against `statistic` over a method's variants.

    Args:
      variants: {variant name: {metric: Estimate}}; variants without both metrics (or with a
        non-finite value) are left out.
      statistic: the cost statistic (lower is better).
      reward: the reward metric (higher is better).

    Returns:
      The Frontier, or None when no variant has both metrics.
    """
    names = [
        n
        for n, m in variants.items()
        if statistic in m
        and reward in m
        and math.isfinite(m[statistic][0])
        and math.isfinite(m[reward][0])
    ]
    if not names:
        return None
    cost = [Estimate(*variants[n][statistic]) for n in names]
    rew = [Estimate(*variants[n][reward]) for n in names]
    keep = pareto_indices([e.value for e in cost], [e.value for e in rew])
    on = set(keep.tolist())
    return Frontier(
        names=tuple(names[i] for i in keep),
        cost=tuple(cost[i] for i in keep),
        reward=tuple(rew[i] for i in keep),
        dominated=tuple(n for i, n in enumerate(names) if i not in on),
    )


def _curve(frontier: Frontier) -> tuple[np.ndarray, np.ndarray]:
    """Distinct frontier points ([F'] costs strictly increasing, [F'] rewards)."""
    cost, index = np.unique(frontier.cost_values, return_index=True)
    return cost, frontier.reward_values[index]


def interpolate_reward(frontier: Frontier, at) -> np.ndarray:
    """R(c) along the frontier (piecewise linear), NaN outside [c_min, c_max].

    Args:
      frontier: a Frontier.
      at: [M] costs (or a scalar).

    Returns:
      [M] float64 rewards (the shape of `at`).
    """
    at = np.asarray(at, np.float64)
    cost, reward = _curve(frontier)
    out = np.interp(at, cost, reward)
    return np.where((at < cost[0]) | (at > cost[-1]), np.nan, out)


def reward_gap(a: Frontier, b: Frontier) -> float | None:
    """Mean of R_a(c) - R_b(c) over the overlapping cost range (module docstring); None when the
    ranges do not overlap."""
    lo = max(a.cost_range[0], b.cost_range[0])
    hi = min(a.cost_range[1], b.cost_range[1])
    if lo > hi:
        return None
    if lo == hi:
        return float(interpolate_reward(a, lo) - interpolate_reward(b, lo))
    inner = np.concatenate([a.cost_values, b.cost_values])
    grid = np.unique(np.concatenate([[lo, hi], inner[(inner > lo) & (inner < hi)]]))  # [G]
    diff = interpolate_reward(a, grid) - interpolate_reward(b, grid)  # [G]
    # Exact: the difference is linear between consecutive breakpoints.
    area = np.sum(0.5 * (diff[1:] + diff[:-1]) * np.diff(grid))
    return float(area / (hi - lo))


@dataclasses.dataclass(frozen=True)
class Gap:
    """The reward gap of method `a` over method `b` at equal `statistic`, across seeds.

    `estimate` is the mean over the seeds where both frontiers exist and overlap, with a Student-t
    interval over the per-seed gaps (NaN bounds with one such seed; None with none).
    """

    a: str
    b: str
    statistic: str
    estimate: Estimate | None
    per_seed: dict[str, float]
    skipped: dict[str, str]  # seed -> why it has no gap


def gap_verdict(gap: Gap) -> str:
    """Whether the gap is distinguishable from 0 at the interval's confidence: "a > b" or
    "b > a" when the interval excludes 0, "tied" when it covers 0, and no verdict without an
    interval (one seed: a single paired difference has no spread to judge it by)."""
    e = gap.estimate
    if e is None:
        return "not compared"
    if math.isnan(e.low) or math.isnan(e.high):
        n = len(gap.per_seed)
        return f"no interval ({n} seed{'s' if n != 1 else ''}): no verdict"
    if e.low > 0:
        return f"{gap.a} > {gap.b} (the interval excludes 0)"
    if e.high < 0:
        return f"{gap.b} > {gap.a} (the interval excludes 0)"
    return "tied (the interval covers 0)"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean of S values with the Student-t interval of the mean (NaN bounds when S = 1)."""
    array = np.asarray(values, np.float64)
    if array.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(array.mean())
    if array.size == 1:
        return Estimate(mean, math.nan, math.nan)
    from scipy.special import stdtrit  # scipy is pinned (a jax dependency)

    t = float(stdtrit(array.size - 1, (1.0 + confidence) / 2.0))
    half = t * float(array.std(ddof=1)) / math.sqrt(array.size)
    return Estimate(mean, mean - half, mean + half)


def seed_gap(
    seeds: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Estimate]]]],
    a: str,
    b: str,
    statistic: str,
    *,
    reward: str = REWARD,
    confidence: float = 0.95,
) -> Gap:
    """The paired reward gap of `a` over `b` at equal `statistic`, per seed and across seeds.

    Args:
      seeds: {seed: {method: {variant: {metric: Estimate}}}}.
      a, b: method names.
      statistic: the cost statistic.
      reward: the reward metric.
      confidence: coverage of the t-interval over seeds.
    """
    per_seed, skipped = {}, {}
    for seed, methods in seeds.items():
        fronts = {}
        for m in (a, b):
            fronts[m] = pareto_frontier(methods.get(m, {}), statistic, reward=reward)
        missing = [m for m in (a, b) if fronts[m] is None]
        if missing:
            skipped[seed] = f"no {statistic} and {reward} for {', '.join(missing)}"
            continue
        gap = reward_gap(fronts[a], fronts[b])
        if gap is None:
            ra, rb = fronts[a].cost_range, fronts[b].cost_range
            skipped[seed] = (
                f"the {statistic} ranges do not overlap ({a}: [{ra[0]:.4g}, {ra[1]:.4g}], "
                f"{b}: [{rb[0]:.4g}, {rb[1]:.4g}])"
            )
            continue
        per_seed[seed] = gap
    estimate = t_interval(list(per_seed.values()), confidence) if per_seed else None
    return Gap(a, b, statistic, estimate, per_seed, skipped)


# ---- Algorithm 1's constrained choice ----------------------------------------------------------

_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*?)\s*<=\s*(\S+)\s*$")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """`statistic <= threshold`, to be met by the statistic's upper confidence bound."""

    statistic: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.statistic}<={self.threshold:g}"


def parse_constraint(text: str) -> Constraint:
    """`"catastrophic_rate<=0.01"` -> Constraint("catastrophic_rate", 0.01).

    Raises ValueError naming the text when it is not `STATISTIC<=NUMBER` with a finite number.
    """
    match = _CONSTRAINT.match(text)
    threshold = None
    if match:
        try:
            threshold = float(match.group(2))
        except ValueError:
            threshold = None
    if threshold is None or not math.isfinite(threshold):
        raise ValueError(
            f"constraint {text!r}: expected STATISTIC<=NUMBER, e.g. catastrophic_rate<=0.01 "
            "or cost_cvar_0.99<=5"
        )
    assert match is not None  # a threshold was parsed from it
    return Constraint(match.group(1), threshold)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One method's constrained optimum (None when the safe set is empty).

    Attributes:
      constraint: the constraint.
      variant: the chosen variant, or None.
      reward, statistic: the chosen variant's Estimates, or None.
      safe: the safe set (variants whose upper bound meets the threshold), best reward first.
      closest: when the safe set is empty, the variant with the lowest upper bound.
      missing: variants without the statistic or the reward (not candidates).
      tied: the other safe variants whose reward interval overlaps the chosen one's: the data
        cannot tell them apart at the interval's confidence.
      has_interval: False when the chosen variant's reward has no interval (no verdict then).
    """

    constraint: Constraint
    variant: str | None
    reward: Estimate | None
    statistic: Estimate | None
    safe: tuple[str, ...]
    closest: str | None
    missing: tuple[str, ...]
    tied: tuple[str, ...] = ()
    has_interval: bool = True


def constrained_choice(
    variants: Mapping[str, Mapping[str, Estimate]],
    constraint: Constraint,
    *,
    reward: str = REWARD,
) -> Choice:
    """Algorithm 1's choice among one method's variants (module docstring).

    Args:
      variants: {variant: {metric: Estimate}}; the upper bound is `Estimate.high`.
      constraint: `statistic <= threshold`.
      reward: the metric to maximise.

    Returns:
      A Choice; `variant` is None when no variant's upper bound meets the threshold.
    """
    stat = constraint.statistic
    usable, missing = [], []
    for name, m in variants.items():
        ok = stat in m and reward in m
        if ok:
            high, value = Estimate(*m[stat]).high, Estimate(*m[reward]).value
            ok = math.isfinite(high) and math.isfinite(value)
        (usable if ok else missing).append(name)
    safe = [n for n in usable if Estimate(*variants[n][stat]).high <= constraint.threshold]
    safe.sort(key=lambda n: (-variants[n][reward][0], variants[n][stat][0], n))
    if safe:
        best = safe[0]
        chosen = Estimate(*variants[best][reward])
        has_interval = not math.isnan(chosen.low)
        tied = tuple(
            n
            for n in safe[1:]
            if has_interval and Estimate(*variants[n][reward]).high >= chosen.low
        )
        return Choice(
            constraint,
            best,
            chosen,
            Estimate(*variants[best][stat]),
            tuple(safe),
            None,
            tuple(missing),
            tied,
            has_interval,
        )
    closest = min(usable, key=lambda n: (variants[n][stat][2], n)) if usable else None
    return Choice(constraint, None, None, None, (), closest, tuple(missing))
