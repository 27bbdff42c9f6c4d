"""Per-example scores and their aggregates: target probability, rank, top-k hits, confidence
intervals over facts, and recovery relative to the P and F baselines.

Definitions (what every number nngraft prints means):

- **target**: the first token of ``" " + answer`` as it continues the prompt
  (:func:`nngraft.result.target_token_id`), the paper's first-token target.
- **prob**: softmax probability of the target at the prompt's last token, computed in float32
  from the next-token logits. **logprob** is its natural log (from ``log_softmax``, so it is
  finite even when ``prob`` underflows to 0).
- **rank**: 0-based; the number of vocabulary entries whose log-probability is *strictly*
  higher than the target's (ties do not push the target down).
- **top-k hit**: ``rank < k``, i.e. fewer than ``k`` tokens beat the target (the paper's
  "1-based rank ≤ k"). ``top_1`` is greedy accuracy except for exact ties.
- **logit_diff**: the target's logit minus the foil's at the prompt's last token; the foil is P's
  most likely token other than the target (``foil_token``), so a positive value means the model
  prefers the answer to what P would have said.
- **kl_f_graft** = KL(F ‖ G) and **kl_graft_p** = KL(G ‖ P), in nats, over the next-token
  distributions (float32 log-softmax) of F, the grafted model G and P on the same prompt: how far
  a graft is from the finetuned model's prediction, and how far it moved from P's.
- **aggregate**: within a group (e.g. one model × template × spec), first the mean per fact
  (a fact seen through several templates counts once), then the mean over facts, with a 95 %
  confidence interval over facts: a **percentile bootstrap** (default; 2,000 resamples of the
  facts, fixed seed, so reruns print identical intervals) or a **Student-t interval**
  (``method="t"``).
- **recovery** of a spec = ``(mean_G − mean_P) / (mean_F − mean_P)`` of mean target
  probability, where P is the no-graft baseline and F the everything-grafted baseline, computed
  on the same facts. 0 means "no better than P", 1 means "as good as F"; it can be negative or
  above 1. When ``|mean_F − mean_P| < min_gap`` (default 0.05) the finetuning did not move the
  metric enough for a ratio to mean anything, so recovery is reported as ``nan`` (with the reason
  in ``note``). Its interval is a *paired* bootstrap: the same resampled facts in numerator and
  denominator.

Example:
    >>> import torch
    >>> s = score_logits(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), [1], ks=(1, 2))
    >>> s.rank.tolist(), s.hits[1].tolist(), s.hits[2].tolist(), round(float(s.prob[0]), 4)
    ([1], [False], [True], 0.1966)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .metric_registry import DEFAULT_KS, stored_metrics

CI_LEVEL = 0.95
N_BOOTSTRAP = 2000
MIN_GAP = 0.05
"""Smallest ``|mean_F − mean_P|`` (in probability) for which recovery is reported."""


# ---------------------------------------------------------------------------------------------
# Per example
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenScores:
    """Scores of one batch of next-token distributions against one target id per row."""

    target_id: torch.Tensor  # (B,) long
    prob: torch.Tensor  # (B,) float32
    logprob: torch.Tensor  # (B,) float32
    rank: torch.Tensor  # (B,) long, 0-based
    hits: dict[int, torch.Tensor]  # k -> (B,) bool, rank < k
    top_ids: torch.Tensor  # (B, n_top) long, most likely first
    top_probs: torch.Tensor  # (B, n_top) float32


def score_logits(logits: torch.Tensor, target_ids: Sequence[int] | torch.Tensor, *,
                 ks: Iterable[int] = DEFAULT_KS, n_top: int = 10) -> TokenScores:
    """Score next-token ``logits`` (B, V) against ``target_ids`` (one per row).

    Example:
        >>> s = score_logits(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), [2], ks=(1, 3), n_top=2)
        >>> round(float(s.prob[0]), 6), int(s.rank[0]), s.top_ids.tolist()
        (0.2, 2, [[0, 1]])
    """
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (batch, vocab), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
    ids = torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)
    if ids.numel() != logp.shape[0]:
        raise ValueError(f"{ids.numel()} target ids for {logp.shape[0]} rows of logits")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= logp.shape[1]):
        raise ValueError(f"target id out of range for a vocabulary of {logp.shape[1]}: {ids.tolist()}")
    chosen = logp.gather(1, ids[:, None])
    rank = (logp > chosen).sum(dim=1)
    k_top = min(n_top, logp.shape[1])
    top = logp.topk(k_top, dim=-1)
    return TokenScores(
        target_id=ids,
        prob=chosen[:, 0].exp(),
        logprob=chosen[:, 0],
        rank=rank,
        hits={int(k): rank < int(k) for k in ks},
        top_ids=top.indices,
        top_probs=top.values.exp(),
    )


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean with a confidence interval: ``mean`` in ``[low, high]`` over ``n`` facts.

    ``method`` is ``"bootstrap"``, ``"t"``, or ``"none"`` (n < 2: no interval, low = high = mean)."""

    mean: float
    low: float
    high: float
    n: int
    method: str
    note: str = ""

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "nan" + (f" ({self.note})" if self.note else "")
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom.

    Example:
        >>> round(student_t_cdf(2.262157, 9), 5)
        0.975
    """
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`student_t_cdf`; 1e-10 accurate).

    Example:
        >>> round(student_t_quantile(0.975, 9), 4)
        2.2622
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


def _interval(values: Sequence[float], method: str,
              bounds: Callable[[np.ndarray, float], tuple[float, float]]) -> Estimate:
    """Mean of ``values`` with the interval ``bounds(x, mean)`` gives by ``method`` (``x``: the
    values as float64, at least two of them); fewer than two values have no interval."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, method, "no facts")
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, mean, mean, n, "none", "one fact: no interval")
    low, high = bounds(x, mean)
    return Estimate(mean, low, high, n, method)


def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> Estimate:
    """Mean ± t_{(1+level)/2, n−1} · s/√n (s: sample standard deviation, ddof = 1).

    Example:
        >>> e = t_interval([1.0, 2.0, 3.0, 4.0])
        >>> round(e.mean, 3), round(e.low, 3), round(e.high, 3)
        (2.5, 0.446, 4.554)
    """
    def bounds(x: np.ndarray, mean: float) -> tuple[float, float]:
        n = int(x.size)
        half = student_t_quantile((1.0 + level) / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
        return mean - half, mean + half

    return _interval(values, "t", bounds)


_RESAMPLES: dict[tuple[int, int, int], np.ndarray] = {}


def bootstrap_indices(n: int, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(n_boot, n) indices of facts drawn with replacement; deterministic in (n, n_boot, seed),
    so every spec of a group is resampled with the *same* facts (a paired bootstrap)."""
    key = (n, n_boot, seed)
    if key not in _RESAMPLES:
        if len(_RESAMPLES) > 64:
            _RESAMPLES.clear()
        _RESAMPLES[key] = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return _RESAMPLES[key]


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_interval(values: Sequence[float], level: float = CI_LEVEL, *, n_boot: int = N_BOOTSTRAP,
                       seed: int = 0) -> Estimate:
    """Mean with a percentile-bootstrap interval over the values (one value per fact).

    Example:
        >>> e = bootstrap_interval([0.0, 1.0] * 50)
        >>> e.mean, 0.38 < e.low < 0.45, 0.55 < e.high < 0.62
        (0.5, True, True)
    """
    def bounds(x: np.ndarray, mean: float) -> tuple[float, float]:
        return _percentiles(x[bootstrap_indices(int(x.size), n_boot, seed)].mean(axis=1), level)

    return _interval(values, "bootstrap", bounds)


def mean_ci(values: Sequence[float], *, method: str = "bootstrap", level: float = CI_LEVEL,
            n_boot: int = N_BOOTSTRAP, seed: int = 0) -> Estimate:
    """Mean and confidence interval with ``method`` ``"bootstrap"`` (default) or ``"t"``."""
    if method == "bootstrap":
        return bootstrap_interval(values, level, n_boot=n_boot, seed=seed)
    if method == "t":
        return t_interval(values, level)
    raise ValueError(f"unknown interval method {method!r}; use 'bootstrap' or 't'")


def recovery(grafted: Sequence[float], p: Sequence[float], f: Sequence[float], *,
             min_gap: float = MIN_GAP, level: float = CI_LEVEL, n_boot: int = N_BOOTSTRAP,
             seed: int = 0) -> Estimate:
    """``(mean(grafted) − mean(p)) / (mean(f) − mean(p))`` over the same facts (index-aligned),
    with a paired percentile-bootstrap interval. ``nan`` when ``|mean(f) − mean(p)| < min_gap``.

    Resamples whose own denominator is below ``min_gap`` are left out of the interval (the
    count is given in ``note``).

    Example:
        >>> round(recovery([0.5, 0.7], [0.1, 0.1], [0.9, 0.9]).mean, 6)
        0.625
        >>> recovery([0.5], [0.10], [0.12]).note
        'F ≈ P: |mean_F − mean_P| = 0.020 < min_gap 0.05'
    """
    g, p0, f0 = (np.asarray(v, dtype=np.float64) for v in (grafted, p, f))
    if not (g.shape == p0.shape == f0.shape):
        raise ValueError(f"recovery needs the same facts in all three: got {g.size}, {p0.size}, {f0.size}")
    n = int(g.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap", "no facts")
    gap = float(f0.mean() - p0.mean())
    if abs(gap) < min_gap:
        return Estimate(math.nan, math.nan, math.nan, n, "bootstrap",
                        f"F ≈ P: |mean_F − mean_P| = {abs(gap):.3f} < min_gap {min_gap:g}")
    mean = float((g.mean() - p0.mean()) / gap)
    if n < 2:
        return Estimate(mean, mean, mean, n, "none", "one fact: no interval")
    idx = bootstrap_indices(n, n_boot, seed)
    gaps = f0[idx].mean(axis=1) - p0[idx].mean(axis=1)
    keep = np.abs(gaps) >= min_gap
    ratios = (g[idx].mean(axis=1) - p0[idx].mean(axis=1))[keep] / gaps[keep]
    note = "" if keep.all() else f"{int((~keep).sum())} of {n_boot} resamples had F ≈ P and were left out"
    if ratios.size < 2:
        return Estimate(mean, math.nan, math.nan, n, "bootstrap", note)
    low, high = _percentiles(ratios, level)
    return Estimate(mean, low, high, n, "bootstrap", note)


# ---------------------------------------------------------------------------------------------
# Aggregating result rows
# ---------------------------------------------------------------------------------------------

GROUP_KEYS: tuple[str, ...] = ("model", "template", "spec")


def per_fact(rows: Iterable[Mapping[str, Any]], column: str) -> dict[str, float]:
    """``{fact_id: mean of column}`` (a fact seen through several templates counts once).
    Booleans (top-k hits) average to a fraction."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        value = row[column]
        if value is None:
            continue
        sums.setdefault(str(row["fact_id"]), []).append(float(value))
    return {fact: sum(v) / len(v) for fact, v in sums.items()}


@dataclass(frozen=True)
class Aggregate:
    """One group's summary: its keys, the number of facts and examples, and estimates per metric."""

    keys: dict[str, Any]
    n_facts: int
    n_examples: int
    metrics: dict[str, Estimate]
    recovery: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.keys, n_facts=self.n_facts, n_examples=self.n_examples)
        for name, est in self.metrics.items():
            out[name] = est.mean
            out[f"{name}_low"] = est.low
            out[f"{name}_high"] = est.high
        if self.recovery is not None:
            out["recovery"] = self.recovery.mean
            out["recovery_low"] = self.recovery.low
            out["recovery_high"] = self.recovery.high
            out["recovery_note"] = self.recovery.note
        return out


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The registered metrics (:mod:`.metric_registry`) present in ``rows``: prob, logprob, rank,
    every stored ``top_k`` hit column, then the others in registration order."""
    return [m.name for m in stored_metrics(rows[0])] if rows else []


def aggregate(rows: Sequence[Mapping[str, Any]], *, by: Sequence[str] = GROUP_KEYS,
              metrics: Sequence[str] | None = None, method: str = "bootstrap", level: float = CI_LEVEL,
              n_boot: int = N_BOOTSTRAP, seed: int = 0, p_spec: str | None = "p",
              f_spec: str | None = "f", min_gap: float = MIN_GAP) -> list[Aggregate]:
    """Group ``rows`` by ``by`` and summarize each metric over facts (see the module docstring).

    When ``"spec"`` is in ``by`` and the rows hold the baselines ``p_spec`` and ``f_spec`` for the
    same other keys, each group also gets the recovery of mean ``prob`` on the facts all three
    share. Groups keep the order in which they first appear.

    Example:
        >>> rows = [dict(model="m", template="t", spec=s, fact_id=str(i), prob=v)
        ...         for s, vals in {"p": [0.1, 0.1], "f": [0.9, 0.9], "g": [0.5, 0.7]}.items()
        ...         for i, v in enumerate(vals)]
        >>> [round(a.recovery.mean, 3) for a in aggregate(rows, metrics=["prob"])]
        [0.0, 1.0, 0.625]
    """
    rows = list(rows)
    metrics = list(metrics) if metrics is not None else metric_columns(rows)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in by), []).append(row)
    spec_pos = list(by).index("spec") if "spec" in by else None

    def baseline(key: tuple, name: str | None) -> dict[str, float] | None:
        if spec_pos is None or name is None:
            return None
        other = key[:spec_pos] + (name,) + key[spec_pos + 1:]
        return per_fact(groups[other], "prob") if other in groups else None

    out = []
    for key, members in groups.items():
        estimates = {}
        facts: set[str] = set()
        for metric in metrics:
            values = per_fact(members, metric)
            facts |= set(values)
            ordered = [values[f] for f in sorted(values)]
            estimates[metric] = mean_ci(ordered, method=method, level=level, n_boot=n_boot, seed=seed)
        rec = None
        p_vals, f_vals = baseline(key, p_spec), baseline(key, f_spec)
        if p_vals is not None and f_vals is not None:
            g_vals = per_fact(members, "prob")
            shared = sorted(set(g_vals) & set(p_vals) & set(f_vals))
            rec = recovery([g_vals[i] for i in shared], [p_vals[i] for i in shared],
                           [f_vals[i] for i in shared], min_gap=min_gap, level=level, n_boot=n_boot,
                           seed=seed)
        out.append(Aggregate(dict(zip(by, key)), len(facts), len(members), estimates, rec))
    return out
