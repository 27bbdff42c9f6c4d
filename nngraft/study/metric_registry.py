"""The one registry of per-example metrics: what ``nngraft run`` and sweeps store in every results
row, what the tables, ``--json``, plots and ``nngraft localize`` read back.

A **metric** is a named callable (like TransformerLens's ``patching_metric``)::

    fn(logits, inputs) -> values
    #  logits: (B, V) next-token logits of the grafted model, one row per prompt
    #  inputs: MetricInputs(target_ids (B,), p_logits (B, V) or None, f_logits (B, V) or None)
    #  values: (B,) one number (or bool) per prompt

``p_logits`` / ``f_logits`` are P's and F's next-token logits on the same prompts (the run's
baseline rows); a metric that reads them says so with ``baselines=True``. Keep ``fn`` free of
``.detach()`` where the maths allows, so it stays differentiable: :meth:`Metric.scalar` binds the
targets and averages over prompts, giving the ``logits -> scalar`` callable that gradient methods
(``Grafter.attribute``) take.

Adding a metric is one function here (or anywhere, for your own) and one test::

    @register("target_margin", label="margin", description="target logit minus the mean logit")
    def target_margin(logits, inputs):
        return logits.gather(1, inputs.target_ids[:, None])[:, 0] - logits.mean(-1)

Registered metrics are computed by ``evaluate`` (sweeps, ``nngraft run``) when asked for
(``metrics=[...]``, ``--metric NAME``, or ``--metric module:function`` for a callable in your own
module), and every registered metric a results file holds is aggregated, tabled and plotted.

Example:
    >>> import torch
    >>> logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> inputs = MetricInputs(torch.tensor([2]))
    >>> round(float(get_metric("prob")(logits, inputs)[0]), 6), int(get_metric("rank")(logits, inputs)[0])
    (0.2, 2)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..result import kl_divergence, logit_difference, top_other_token


@dataclass(frozen=True)
class MetricInputs:
    """What a metric scores the logits against, one entry per prompt."""

    target_ids: torch.Tensor
    """(B,) the answer's first token (:func:`nngraft.result.target_token_id`)."""
    p_logits: torch.Tensor | None = None
    """(B, V) P's next-token logits on the same prompts (the no-graft baseline), if the run has them."""
    f_logits: torch.Tensor | None = None
    """(B, V) F's next-token logits on the same prompts (the everything-grafted baseline)."""


MetricFn = Callable[[torch.Tensor, MetricInputs], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A named per-example metric and how tables and plots show it."""

    name: str
    """Column name in results rows (``results.jsonl``) and key in ``--json``."""
    fn: MetricFn | None
    """``(logits (B, V), MetricInputs) -> (B,)``; ``None``: stored by another step (``answer_logprob``)."""
    label: str = ""
    """Column header in tables (default: the name)."""
    description: str = ""
    """One line: docs, ``--help``, plot axes."""
    fmt: str = ".3f"
    """Format of a mean in tables."""
    kind: type = float
    """How a row stores a value: ``float``, ``int`` or ``bool`` (booleans average to a fraction)."""
    baselines: bool = False
    """Reads ``inputs.p_logits`` / ``inputs.f_logits``."""
    unit_interval: bool = False
    """Values lie in [0, 1] (plots fix the axis)."""
    summary: str = ""
    """What the mean over facts is called in texts and on axes (default ``mean NAME``)."""

    def __call__(self, logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
        if self.fn is None:
            raise MetricError(f"metric {self.name!r} is not computed from logits ({self.description})")
        if self.baselines and (inputs.p_logits is None or inputs.f_logits is None):
            raise MetricError(f"metric {self.name!r} needs P's and F's logits on the same prompts")
        values = self.fn(logits, inputs)
        if values.shape != (logits.shape[0],):
            raise MetricError(f"metric {self.name!r} returned shape {tuple(values.shape)}; a metric returns one "
                              f"value per prompt, shape ({logits.shape[0]},)")
        return values

    def row_values(self, logits: torch.Tensor, inputs: MetricInputs) -> list[Any]:
        """The values as a results row stores them (plain Python numbers)."""
        return [self.kind(v) for v in self(logits, inputs).detach().cpu().tolist()]

    def scalar(self, target_ids: Sequence[int] | torch.Tensor, *, p_logits: torch.Tensor | None = None,
               f_logits: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``logits (B, V) -> scalar``: the mean over prompts, targets bound (the form
        ``Grafter.attribute`` and TransformerLens's patching functions take); carries ``.name``."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)

        def metric(logits: torch.Tensor) -> torch.Tensor:
            inputs = MetricInputs(ids.to(logits.device), p_logits, f_logits)
            return self(logits, inputs).float().mean()

        metric.name = self.name  # type: ignore[attr-defined]
        metric.__name__ = self.name
        return metric

    @property
    def header(self) -> str:
        return self.label or self.name

    @property
    def mean_label(self) -> str:
        return self.summary or f"mean {self.name}"


class MetricError(ValueError):
    """An unknown metric name, a metric that cannot be computed here, or a bad return shape."""


REGISTRY: dict[str, Metric] = {}
"""Every known metric by name, in registration order (the order of table columns)."""

ALIASES: dict[str, str] = {"top1": "top_1"}
"""Other spellings accepted by :func:`get_metric` (``nngraft localize --metric top1``)."""


def register(name: str | Metric | MetricFn | None = None, *, label: str = "", description: str = "",
             fmt: str = ".3f", kind: type = float, baselines: bool = False, unit_interval: bool = False,
             summary: str = "", replace: bool = False) -> Any:
    """Add a metric to :data:`REGISTRY`. Use as a decorator (``@register("name", label=...)``),
    or call with a :class:`Metric`, or with a function (named after it). Returns what it was given
    (the decorator: the function). A second metric of the same name is refused unless ``replace``."""

    def add(metric: Metric) -> None:
        if metric.name in REGISTRY and not replace and REGISTRY[metric.name] != metric:
            raise MetricError(f"a metric named {metric.name!r} is already registered; pick another name "
                              "or pass replace=True")
        REGISTRY[metric.name] = metric

    if isinstance(name, Metric):
        add(name)
        return name
    if callable(name):
        add(Metric(name.__name__, name, label, description or (name.__doc__ or "").strip().split("\n")[0], fmt,
                   kind, baselines, unit_interval, summary))
        return name

    def decorator(fn: MetricFn) -> MetricFn:
        add(Metric(name or fn.__name__, fn, label, description or (fn.__doc__ or "").strip().split("\n")[0],
                   fmt, kind, baselines, unit_interval, summary))
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove a metric (tests and notebooks that registered their own)."""
    REGISTRY.pop(name, None)


def get_metric(metric: str | Metric | MetricFn) -> Metric:
    """A :class:`Metric` from a registered name, a ``module:function`` import path (registered on
    first use), a :class:`Metric`, or a plain callable ``fn(logits, inputs)``."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return Metric(getattr(metric, "__name__", "metric"), metric)
    metric = ALIASES.get(metric, metric)
    if metric in REGISTRY:
        return REGISTRY[metric]
    if metric.startswith("top_") and metric[4:].isdigit() and int(metric[4:]) > 0:
        return register(top_k(int(metric[4:])))
    if ":" in metric:
        module, _, attr = metric.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise MetricError(f"metric {metric!r}: cannot import {attr!r} from {module!r} ({exc})") from None
        found = get_metric(fn)
        if found.name not in REGISTRY:
            register(found)
        return REGISTRY.get(found.name, found)
    raise MetricError(f"unknown metric {metric!r}; known: {', '.join(REGISTRY)} (top_K for any K), or "
                      "module:function for your own")


def resolve(metrics: Iterable[str | Metric | MetricFn] | None) -> list[Metric]:
    """:func:`get_metric` for each (duplicates dropped, order kept); ``None`` -> the defaults."""
    chosen = DEFAULT_METRICS if metrics is None else metrics
    out: dict[str, Metric] = {}
    for m in chosen:
        metric = get_metric(m)
        out.setdefault(metric.name, metric)
    return list(out.values())


def stored_metrics(row: Mapping[str, Any]) -> list[Metric]:
    """The registered metrics a results row holds, in registry order (``top_k`` columns by k)."""
    for column in row:
        if column.startswith("top_") and column[4:].isdigit() and column not in REGISTRY:
            get_metric(column)
    found = [m for m in REGISTRY.values() if m.name in row]
    tops = sorted((m for m in found if _top_k_of(m.name)), key=lambda m: _top_k_of(m.name) or 0)
    rest = [m for m in found if not _top_k_of(m.name)]
    first = [m for m in rest if m.name in ("prob", "logprob", "rank")]
    return first + tops + [m for m in rest if m not in first]


def _top_k_of(name: str) -> int | None:
    return int(name[4:]) if name.startswith("top_") and name[4:].isdigit() else None


# ---------------------------------------------------------------------------------------------
# The built-in metrics (definitions: nngraft.study.metrics' module docstring, docs/study.md)
# ---------------------------------------------------------------------------------------------


def _target_logprob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, inputs.target_ids.reshape(-1, 1).to(logp.device))[:, 0]


@register("prob", label="mean prob", description="softmax probability of the target token", unit_interval=True,
          summary="mean target probability")
def prob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    return _target_logprob(logits, inputs).exp()


@register("logprob", label="mean logprob", description="log-probability of the target token", fmt=".2f",
          summary="mean target log-probability")
def logprob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    return _target_logprob(logits, inputs)


@register("rank", label="mean rank", description="0-based rank of the target (tokens strictly more likely)",
          fmt=".1f", kind=int, summary="mean target rank")
def rank(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    chosen = logp.gather(1, inputs.target_ids.reshape(-1, 1).to(logp.device))
    return (logp > chosen).sum(dim=1)


def top_k(k: int) -> Metric:
    """``top_k``: the target is among the ``k`` most likely tokens (rank < k)."""
    return Metric(f"top_{k}", lambda logits, inputs: rank(logits, inputs) < k, f"top-{k}",
                  f"target among the {k} most likely tokens (rank < {k})", ".2f", bool, False, True,
                  f"top-{k} accuracy")


@register("logit_diff", label="logit diff", description="target logit minus P's most likely other token's",
          fmt=".2f", baselines=True)
def logit_diff(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    ids = inputs.target_ids.reshape(-1).cpu()
    return logit_difference(logits, ids, top_other_token(inputs.p_logits, ids))


@register("kl_f_graft", label="KL(F‖G)", description="KL(F ‖ grafted) in nats over the next token",
          baselines=True)
def kl_f_graft(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    return kl_divergence(inputs.f_logits, logits)


@register("kl_graft_p", label="KL(G‖P)", description="KL(grafted ‖ P) in nats over the next token",
          baselines=True)
def kl_graft_p(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    return kl_divergence(logits, inputs.p_logits)


register(Metric("answer_logprob", None, "answer logprob",
                "log P(whole answer | prompt), teacher-forced (run with --answer-logprob)", ".2f"))

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 100)
"""The top-k cut-offs stored with every row (the paper's figures used k = 100)."""
for _k in DEFAULT_KS:
    register(top_k(_k))

DEFAULT_METRICS: tuple[str, ...] = ("prob", "logprob", "rank", "logit_diff", "kl_f_graft", "kl_graft_p")
"""Computed for every row by default (plus ``top_k`` for each k asked for)."""
