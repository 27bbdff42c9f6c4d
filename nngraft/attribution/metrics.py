"""Attribution metrics: next-token logits ``(n_prompts, vocab)`` → a differentiable scalar.

Example:
    >>> import torch
    >>> float(target_logprob([1])(torch.tensor([[0.0, 0.0]])))  # log(1/2)
    -0.6931...
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ArgumentError

Metric = Callable[[torch.Tensor], torch.Tensor]
"""Next-token logits ``(n_prompts, vocab)`` → a scalar tensor (differentiable)."""



def _ids(targets: Sequence[int] | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
    if ids.numel() == 1 and logits.shape[0] > 1:
        ids = ids.expand(logits.shape[0])
    if ids.numel() != logits.shape[0]:
        raise ArgumentError(f"metric: {ids.numel()} target ids for {logits.shape[0]} prompts; give one per prompt")
    return ids


def _weighted(values: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    return (values * torch.as_tensor(weights, dtype=values.dtype, device=values.device)).sum()


class NamedMetric:
    """A metric with a name (shown in tables and files); call it on logits."""

    def __init__(self, name: str, fn: Metric) -> None:
        self.name, self.fn = name, fn

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits)

    def __repr__(self) -> str:
        return f"NamedMetric({self.name!r})"


def target_logprob(targets: Sequence[int] | torch.Tensor, weights: Sequence[float] | None = None) -> NamedMetric:
    """Mean log-probability of each prompt's target token (``weights``: per-prompt weights
    instead of the mean)."""
    return NamedMetric("logprob", lambda logits: _weighted(
        torch.log_softmax(logits, -1).gather(1, _ids(targets, logits)[:, None])[:, 0], weights))


def target_prob(targets: Sequence[int] | torch.Tensor, weights: Sequence[float] | None = None) -> NamedMetric:
    """Mean probability of each prompt's target token."""
    return NamedMetric("prob", lambda logits: _weighted(
        torch.softmax(logits, -1).gather(1, _ids(targets, logits)[:, None])[:, 0], weights))


def logit_diff(targets: Sequence[int] | torch.Tensor, foils: Sequence[int] | torch.Tensor) -> NamedMetric:
    """Mean of ``logit(target) − logit(foil)`` over prompts."""
    def fn(logits: torch.Tensor) -> torch.Tensor:
        t, f = _ids(targets, logits), _ids(foils, logits)
        return (logits.gather(1, t[:, None]) - logits.gather(1, f[:, None])).mean()
    return NamedMetric("logit_diff", fn)


def recovery_metric(targets: Sequence[int] | torch.Tensor, p_value: float, f_value: float,
                    weights: Sequence[float] | None = None, base: str = "prob") -> NamedMetric:
    """``(m − m_P) / (m_F − m_P)`` of the mean target probability (or ``base="logprob"``): the
    study's recovery, linear in the metric, so its attribution is the metric's divided by the gap."""
    inner = (target_prob if base == "prob" else target_logprob)(targets, weights)
    gap = f_value - p_value
    if not gap:
        raise ArgumentError("recovery: F and P score the same (m_F − m_P = 0): recovery is undefined")
    return NamedMetric("recovery", lambda logits: (inner(logits) - p_value) / gap)
