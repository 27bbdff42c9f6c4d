"""Graft attribution: every unit of the graft space scored from one forward and one backward pass.

A *unit* is ``(position group, component, layer)``: a position group is a named span, ``last``
(the last token) or ``other`` (every other token); ``layer`` is ``None`` for global components
(``embed``, ``lm_head``, …). Grafting unit ``u`` replaces the output of the component's module ``c``
at the group's tokens ``t`` by F's: it changes that output by ``d = F_c(x_t) − P_c(x_t)``. To first
order, the change of a scalar metric ``m`` of the next-token logits is therefore::

    score(u) = Σ_{t in u} ⟨ ∂m/∂out_{c,t} , F_c(x_t) − P_c(x_t) ⟩

which one forward pass of P (computing each candidate module's F output on the very input P's
module receives) and one backward pass of ``m`` give for every unit at once — attribution patching
for weights, resolved per token. :func:`attribute` computes it (``Grafter.attribute`` is the same
with the grafter bound); per attention head (q, k, v: the head's output features; o: the head's
input features) and per MLP neuron (gate, up: output features; down: input features) with
``heads=True`` / ``neurons=True`` (the same slices as a spec's ``"weights": {"heads": …}``).

**Integrated** (``steps=k > 1``): the same scores averaged over ``k`` points ``α`` (midpoints of
``[0, 1]``) of the straight path from P to F, every candidate unit grafted at once with weights
``P + α(F − P)`` (every grafted module is affine in its weights, so that module outputs
``P_c(x) + α d(x)``). Like integrated gradients, the scores then add up to ``m(all candidate units
grafted) − m(P)`` (up to the discretisation), and interactions between units (FE needs LT) are
seen; the first-order scores estimate each unit grafted *alone* into P.

:func:`exact_effects` grafts each unit alone (one ``run_grid`` row per unit and prompt) and
returns the exact ``m(P + unit) − m(P)``, to compare (docs/attribution.md).

Only for the local backend (gradients through P in this process).

Example:
    >>> from nngraft import Grafter
    >>> from nngraft.testing import tiny_pair
    >>> g = Grafter(*tiny_pair("llama"))
    >>> att = g.attribute(target_logprob([5]), ["Ada Lovelace stars in"], [{"actor": "Ada Lovelace"}])
    >>> att.groups, len(att.units) == len(att.scores)
    (['actor', 'last', 'other'], True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..arch import stores_weight_in_out
from ..backends.local import swapped_parameters
from ..errors import ArgumentError
from ..spec import GLOBAL_COMPONENTS, GraftRule, GraftSpec, Last, Not, Span
from ..compile.tokens import TokenizedPrompt, pad_left

LAST, OTHER = "last", "other"

Unit = tuple[str, str, "int | None"]
"""``(position group, component, layer)``; ``layer`` is ``None`` for global components."""

Metric = Callable[[torch.Tensor], torch.Tensor]
"""Next-token logits ``(n_prompts, vocab)`` → a scalar tensor (differentiable)."""

HEAD_COMPONENTS = ("q", "k", "v", "o")
NEURON_COMPONENTS = ("gate", "up", "down")


# ---------------------------------------------------------------------------------------------
# Metrics: logits (n_prompts, vocab) → scalar
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Units and position groups
# ---------------------------------------------------------------------------------------------


def group_names(span_names: Sequence[str]) -> list[str]:
    """The position groups: each span, ``last``, ``other``."""
    for reserved in (LAST, OTHER):
        if reserved in span_names:
            raise ArgumentError(f"a span may not be called {reserved!r}: that name is a position group")
    return list(dict.fromkeys(span_names)) + [LAST, OTHER]


def group_selector(group: str, span_names: Sequence[str]) -> Any:
    """The spec position selector of a group (``other`` is written with ``not``)."""
    if group == LAST:
        return Last()
    if group == OTHER:
        return Not(**{"not": [Span(span=s) for s in span_names] + [Last()]})
    return Span(span=group)


def unit_spec(unit: Unit, span_names: Sequence[str], name: str | None = None) -> GraftSpec:
    """The spec that grafts exactly ``unit``."""
    group, component, layer = unit
    rule = GraftRule(components=[component], layers="all" if layer is None else [layer],
                     positions=[group_selector(group, span_names)])
    return GraftSpec(name=name or unit_label(unit), rules=[rule])


def unit_label(unit: Unit) -> str:
    """``"first_actor·embed"``, ``"last·o·L3"``."""
    group, component, layer = unit
    return f"{group}·{component}" + ("" if layer is None else f"·L{layer}")


def group_masks(prompts: Sequence[TokenizedPrompt], span_names: Sequence[str], width: int,
                device: Any = None) -> dict[str, torch.Tensor]:
    """For each group, a (batch, width) bool mask of its cells in the left-padded batch."""
    masks = {g: torch.zeros(len(prompts), width, dtype=torch.bool) for g in group_names(span_names)}
    for row, p in enumerate(prompts):
        pad = width - len(p)
        named = set()
        for s in span_names:
            cols = [pad + i for i in p.spans.get(s, ())]
            masks[s][row, cols] = True
            named.update(cols)
        masks[LAST][row, width - 1] = True
        other = [c for c in range(pad, width - 1) if c not in named]
        masks[OTHER][row, other] = True
    return {g: m.to(device) for g, m in masks.items()}


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------


@dataclass
class Attribution:
    """Scores of every unit. ``scores[i]`` is the first-order effect on the metric of grafting
    ``units[i]`` alone into P; ``integrated[i]`` (with ``steps > 1``) its integrated score along
    P → F; ``heads[unit]`` / ``neurons[unit]`` the split of ``scores`` over heads / neurons (their
    sum plus a bias term, if the module has one, is the unit's score)."""

    units: list[Unit]
    scores: np.ndarray
    groups: list[str]
    spans: list[str]
    n_layers: int
    metric: str
    metric_p: float
    steps: int = 1
    integrated: np.ndarray | None = None
    metric_end: float | None = None
    heads: dict[Unit, np.ndarray] = field(default_factory=dict)
    neurons: dict[Unit, np.ndarray] = field(default_factory=dict)
    exact: np.ndarray | None = None
    seconds: float = 0.0
    n_prompts: int = 0

    def score(self, unit: Unit, *, integrated: bool = False) -> float:
        values = self.integrated if integrated else self.scores
        if values is None:
            raise ArgumentError("no integrated scores: run attribute(..., steps=K) with K > 1")
        return float(values[self.units.index(tuple(unit))])

    def ranked(self, *, integrated: bool = False, absolute: bool = False) -> list[Unit]:
        """Units from the highest score down (``absolute``: by magnitude)."""
        values = self.integrated if integrated and self.integrated is not None else self.scores
        key = np.abs(values) if absolute else values
        order = sorted(range(len(self.units)), key=lambda i: (-key[i], i))
        return [self.units[i] for i in order]

    def components(self) -> list[str]:
        return list(dict.fromkeys(c for _, c, _ in self.units))

    def grid(self, component: str, which: str = "scores") -> np.ndarray:
        """(layers, groups) array of a block component's scores (``which``: ``scores``,
        ``integrated`` or ``exact``); NaN where no unit was scored."""
        values = getattr(self, which)
        if values is None:
            raise ArgumentError(f"no {which} values in this attribution")
        out = np.full((self.n_layers, len(self.groups)), np.nan)
        for (g, c, layer), v in zip(self.units, values):
            if c == component and layer is not None:
                out[layer, self.groups.index(g)] = v
        return out

    def table(self, k: int = 15) -> list[dict[str, Any]]:
        """The ``k`` units with the highest score: label and every value known."""
        rows = []
        for unit in self.ranked()[:k]:
            i = self.units.index(unit)
            row: dict[str, Any] = {"unit": unit_label(unit), "score": float(self.scores[i])}
            if self.integrated is not None:
                row["integrated"] = float(self.integrated[i])
            if self.exact is not None:
                row["exact"] = float(self.exact[i])
            rows.append(row)
        return rows

    def spearman(self, which: str = "scores") -> float:
        """Rank correlation of ``scores`` (or ``integrated``) with the exact single-unit effects."""
        if self.exact is None:
            raise ArgumentError("no exact effects: call att.exact = exact_effects(...) first")
        return spearman(getattr(self, which), self.exact)

    def to_dict(self) -> dict[str, Any]:
        def arr(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(x) for x in a]

        return {
            "format": "nngraft.attribution", "format_version": 1,
            "metric": self.metric, "metric_p": self.metric_p, "metric_end": self.metric_end,
            "steps": self.steps, "groups": self.groups, "spans": self.spans, "n_layers": self.n_layers,
            "n_prompts": self.n_prompts,
            "units": [list(u) for u in self.units], "scores": arr(self.scores),
            "integrated": arr(self.integrated), "exact": arr(self.exact),
            "heads": {unit_label(u): arr(v) for u, v in self.heads.items()},
            "neurons": {unit_label(u): arr(v) for u, v in self.neurons.items()},
            "timing": {"seconds": round(self.seconds, 3)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Attribution":
        def arr(a: Any) -> np.ndarray | None:
            return None if a is None else np.asarray(a, dtype=float)

        units = [(g, c, layer) for g, c, layer in data["units"]]
        return cls(units=units, scores=arr(data["scores"]), groups=list(data["groups"]), spans=list(data["spans"]),
                   n_layers=int(data["n_layers"]), metric=data["metric"], metric_p=data["metric_p"],
                   steps=int(data["steps"]), integrated=arr(data.get("integrated")),
                   metric_end=data.get("metric_end"), exact=arr(data.get("exact")),
                   seconds=float(data.get("timing", {}).get("seconds", 0.0)), n_prompts=int(data.get("n_prompts", 0)))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either side is constant."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # average ranks of ties
            tie = x == value
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------------------------
# The computation
# ---------------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One hooked module: the candidate components it carries (with their output features), the
    cells of each group it is scored on, and what the hook keeps for scoring."""

    path: str
    module: torch.nn.Module
    token_axis: int
    parts: list[tuple[str, int | None, tuple[int, ...] | None]]  # (component, layer, features)
    params: dict[str, torch.Tensor]
    mask: torch.Tensor | None = None  # (batch, width) cells moved along the path (integrated)
    leaf: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    x: torch.Tensor | None = None


def _candidate_components(adapter: Any, components: Sequence[str] | str | None) -> list[str]:
    if components is None or components == "everything":
        return list(adapter.components)
    names = [components] if isinstance(components, str) else list(components)
    blocks, globals_ = adapter.expand(names, rule="attribute")
    return globals_ + blocks


def _sites(grafter: Any, components: list[str]) -> list[_Site]:
    adapter, config, model = grafter.adapter, grafter.model.config, grafter.model
    donor = grafter.donor
    found: dict[str, _Site] = {}
    for comp in components:
        layers = [None] if comp in GLOBAL_COMPONENTS else list(range(grafter.n_layers))
        for layer in layers:
            for site in adapter.sites(comp, layer, config):
                s = found.get(site.path)
                if s is None:
                    module = model.get_submodule(site.path)
                    s = found[site.path] = _Site(site.path, module, site.token_axis, [],
                                                 donor.params(site.path, module))
                s.parts.append((comp, layer, site.features))
    return list(found.values())


def _donor_output(site: _Site, args: tuple, kwargs: dict, alpha_grad: bool) -> torch.Tensor:
    """F's module on the input P's module received (the module's own forward, hooks bypassed)."""
    with swapped_parameters(site.module, site.params), torch.set_grad_enabled(alpha_grad):
        return site.module.forward(*args, **kwargs)


def _cells(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with the token axis at 1 and everything after it flattened: (batch, tokens, features)."""
    if axis != 1:
        t = t.movedim(axis, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _per_feature(site: _Site, component: str, grad: torch.Tensor, kind: str, head_dim: int) -> torch.Tensor | None:
    """(batch, tokens, n) scores split by head (``kind="heads"``) or neuron: output-side slices
    (q, k, v, gate, up) are sums of grad·delta over the slice; input-side ones (o, down) are
    ``(gradᵀ ΔW)_j x_j`` over the slice's input features."""
    module, axis = site.module, site.token_axis
    g = _cells(grad, axis)
    if component in ("o", "down"):
        w_f, w_p = site.params["weight"], module.weight
        dw = (w_f - w_p).to(g.dtype)
        gw = g @ (dw.t() if stores_weight_in_out(module) else dw)  # (batch, tokens, in)
        per_in = gw * _cells(site.x, axis)
        return per_in if kind == "neurons" else per_in.reshape(*per_in.shape[:2], -1, head_dim).sum(-1)
    per_out = g * _cells(site.delta, axis)
    return per_out if kind == "neurons" else per_out.reshape(*per_out.shape[:2], -1, head_dim).sum(-1)


def attribute(grafter: Any, metric: Metric, prompts: Sequence[str] | str,
              spans: Sequence[Mapping[str, Any]] | None = None, *, components: Sequence[str] | str | None = None,
              groups: Sequence[str] | None = None, heads: bool = False, neurons: bool = False, steps: int = 1,
              batch_size: int | None = None, position_spans: Sequence[str] | None = None) -> Attribution:
    """Score every unit (position group × component × layer) by its first-order effect on
    ``metric`` (see the module docstring). ``components``: names or groups (default: every
    component the architecture has); ``groups``: keep only these position groups; ``steps``: also
    integrated scores along P → F with this many points (1: first order only); ``position_spans``:
    the spans that are position groups (default: every span all prompts have; ``other`` is every
    token in none of them and not the last)."""
    from ..util import checks

    where = "Grafter.attribute"
    if not callable(metric):
        raise checks.fail(where, "metric", "a callable: logits (n_prompts, vocab) → scalar tensor", metric)
    checks.positive_int(where, "steps", steps)
    checks.positive_int(where, "batch_size", batch_size, optional=True)
    checks.flag(where, "heads", heads)
    checks.flag(where, "neurons", neurons)
    if getattr(getattr(grafter, "setup", None), "placement", None) is None or grafter.setup.placement.ships_donors:
        raise ArgumentError(f"{where}: attribution needs gradients through P in this process: use the local backend")
    start = time.perf_counter()
    tokenized = grafter.tokenize(prompts, spans, where=where)
    span_names = list(dict.fromkeys(n for p in tokenized for n in p.spans))
    span_names = [n for n in span_names if all(n in p.spans for p in tokenized)]
    if position_spans is not None:
        missing = [n for n in position_spans if n not in span_names]
        if missing:
            raise ArgumentError(f"{where}: position_spans: {missing} are not spans of every prompt "
                                f"(spans: {span_names})")
        span_names = list(dict.fromkeys(position_spans))
    all_groups = group_names(span_names)
    if groups is not None:
        unknown = [g for g in groups if g not in all_groups]
        if unknown:
            raise ArgumentError(f"{where}: groups: unknown position group(s) {unknown}; the groups are {all_groups}")
    kept_groups = [g for g in all_groups if groups is None or g in groups]
    comps = _candidate_components(grafter.adapter, components)
    sites = _sites(grafter, comps)
    head_dim = grafter.adapter.head_dim(grafter.model.config)
    model = grafter.model
    n = len(tokenized)
    size = batch_size or n
    chunks = [list(range(k, min(k + size, n))) for k in range(0, n, size)]
    units: list[Unit] = []
    for comp in comps:
        for layer in ([None] if comp in GLOBAL_COMPONENTS else range(grafter.n_layers)):
            units += [(g, comp, layer) for g in kept_groups]
    index = {u: i for i, u in enumerate(units)}
    alphas = [0.0] if steps == 1 else [0.0] + [(j + 0.5) / steps for j in range(steps)]
    first = np.zeros(len(units))
    integrated = np.zeros(len(units)) if steps > 1 else None
    split: dict[str, dict[Unit, np.ndarray]] = {"heads": {}, "neurons": {}}
    metric_p = metric_end = math.nan

    def kinds_for(comp: str) -> list[str]:
        out = []
        if heads and comp in HEAD_COMPONENTS and not (grafter.adapter.fused_qkv and comp in ("q", "k", "v")):
            out.append("heads")
        if neurons and comp in NEURON_COMPONENTS:
            out.append("neurons")
        return out

    for alpha in alphas:
        # the metric's gradient w.r.t. the logits (once over all prompts), then per chunk a
        # forward with the graph and a backward of logits · that gradient
        logits_all, chunk_inputs = [], []
        for chunk in chunks:
            batch = pad_left([tokenized[i].ids for i in chunk], grafter.pad_id, grafter.device)
            masks = group_masks([tokenized[i] for i in chunk], span_names, batch.input_ids.shape[1], grafter.device)
            chunk_inputs.append((chunk, batch, masks))
        single = len(chunks) == 1
        grad_logits = None
        if not single:
            with torch.no_grad():
                for chunk, batch, masks in chunk_inputs:
                    logits_all.append(_forward(model, sites, batch, masks, kept_groups, alpha, track=False))
            logits = torch.cat(logits_all).detach().requires_grad_(True)
            value = _differentiable(metric(logits), where)
            grad_logits, = torch.autograd.grad(value, logits)
            value = float(value.detach())
        for chunk, batch, masks in chunk_inputs:
            with torch.enable_grad():
                logits = _forward(model, sites, batch, masks, kept_groups, alpha, track=True)
                if single:
                    out = _differentiable(metric(logits), where)
                    value = float(out.detach())
                    leaves = [s.leaf for s in sites if s.leaf is not None]
                    grads = torch.autograd.grad(out, leaves, allow_unused=True)
                else:
                    rows = torch.as_tensor(chunk, device=logits.device)
                    leaves = [s.leaf for s in sites if s.leaf is not None]
                    grads = torch.autograd.grad(logits, leaves, grad_outputs=grad_logits.index_select(0, rows),
                                                allow_unused=True)
            gmap = {id(leaf): g for leaf, g in zip(leaves, grads)}
            for s in sites:
                if s.leaf is None:
                    continue
                grad = gmap[id(s.leaf)]
                if grad is None:  # the metric does not depend on this module (e.g. lm_head off the last column)
                    grad = torch.zeros_like(s.leaf)
                with torch.no_grad():
                    gd = grad * s.delta
                    width = batch.input_ids.shape[1]
                    for comp, layer, features in s.parts:
                        part = gd if features is None else \
                            gd.index_select(-1, torch.as_tensor(features, device=gd.device))
                        per_cell = _cells(part, s.token_axis).sum(-1).double()  # (batch, tokens)
                        cols = per_cell.shape[1]
                        extra = {k: _per_feature(s, comp, grad, k, head_dim) for k in kinds_for(comp)} \
                            if alpha == 0.0 else {}
                        for g in kept_groups:
                            m = masks[g][:, width - cols:]
                            total = float(per_cell[m].sum())
                            i = index[(g, comp, layer)]
                            if alpha == 0.0:
                                first[i] += total
                                for kind, values in extra.items():
                                    v = values[m].double().sum(0).cpu().numpy()
                                    store = split[kind]
                                    store[(g, comp, layer)] = store.get((g, comp, layer), 0) + v
                            else:
                                integrated[i] += total / steps
            _release(sites)
        if alpha == 0.0:
            metric_p = value
    if steps > 1:  # the path's end: every candidate unit grafted (completeness: Σ integrated ≈ end − P)
        with torch.no_grad():
            ends = []
            for chunk in chunks:
                batch = pad_left([tokenized[i].ids for i in chunk], grafter.pad_id, grafter.device)
                masks = group_masks([tokenized[i] for i in chunk], span_names, batch.input_ids.shape[1],
                                    grafter.device)
                ends.append(_forward(model, sites, batch, masks, kept_groups, 1.0, track=False))
            metric_end = float(metric(torch.cat(ends)))
    return Attribution(units=units, scores=first, groups=kept_groups, spans=span_names, n_layers=grafter.n_layers,
                       metric=getattr(metric, "name", getattr(metric, "__name__", "metric")), metric_p=metric_p,
                       steps=steps, integrated=integrated, metric_end=metric_end if steps > 1 else None,
                       heads=split["heads"], neurons=split["neurons"], seconds=time.perf_counter() - start,
                       n_prompts=n)


def _differentiable(value: Any, where: str) -> torch.Tensor:
    """The metric's value, refused unless it is a scalar tensor with a gradient."""
    if not torch.is_tensor(value) or value.numel() != 1:
        raise ArgumentError(f"{where}: metric: Input should return a scalar tensor from the logits, got "
                            f"{type(value).__name__}{'' if not torch.is_tensor(value) else tuple(value.shape)}")
    if not value.requires_grad:
        raise ArgumentError(f"{where}: metric: its value has no gradient with respect to the logits (computed "
                            "under no_grad, detached, or from ranks or argmax); attribution needs a differentiable "
                            "metric, e.g. a log-probability or logit difference")
    return value.reshape(())


def _release(sites: list[_Site]) -> None:
    for s in sites:
        s.leaf = s.delta = s.x = s.mask = None


def _forward(model: torch.nn.Module, sites: list[_Site], batch: Any, masks: dict[str, torch.Tensor],
             groups: list[str], alpha: float, *, track: bool) -> torch.Tensor:
    """One pass of P with every site hooked: the hook computes F's output on the same input
    (``delta``), moves the candidate cells by ``alpha · delta`` (the path P → F), and adds a zero
    leaf whose gradient is ``∂m/∂out`` (``track``). Returns the last column's logits."""
    moved = torch.zeros_like(next(iter(masks.values())))
    for g in groups:
        moved |= masks[g]
    handles = []

    def hook_for(site: _Site) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            delta = _donor_output(site, args, kwargs, alpha_grad=track and alpha > 0) - (
                output if alpha > 0 and track else output.detach())
            if alpha > 0:
                cols = _cells(output, site.token_axis).shape[1]
                cell = moved[:, moved.shape[1] - cols:]
                shape = [1] * output.ndim
                shape[0], shape[site.token_axis] = cell.shape
                keep = cell.reshape(shape).to(output.dtype)
                features = [f for _, _, f in site.parts]
                if all(f is not None for f in features):  # a fused projection: only these features move
                    fmask = torch.zeros(output.shape[-1], dtype=output.dtype, device=output.device)
                    for f in features:
                        fmask[list(f)] = 1
                    keep = keep * fmask
                output = output + alpha * keep * delta
            if track:
                site.delta = delta.detach()
                site.x = args[0].detach() if args and torch.is_tensor(args[0]) else None
                site.leaf = torch.zeros_like(output, requires_grad=True)
                output = output + site.leaf
            return output
        return hook

    try:
        for s in sites:
            handles.append(s.module.register_forward_hook(hook_for(s), with_kwargs=True))
        kwargs = dict(batch.model_inputs(), use_cache=False)
        out = model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return out.logits[:, -1]


# ---------------------------------------------------------------------------------------------
# Exact effects
# ---------------------------------------------------------------------------------------------


def exact_effects(grafter: Any, metric: Metric, prompts: Sequence[str] | str,
                  spans: Sequence[Mapping[str, Any]] | None, units: Sequence[Unit], *,
                  batch_size: int | None = None, progress: Any = None) -> np.ndarray:
    """``m(P with unit u grafted) − m(P)`` for every unit, by exact grafts (one ``run_grid`` row
    per unit and prompt)."""
    tokenized = grafter.tokenize(prompts, spans, where="exact_effects")
    span_names = [n for n in dict.fromkeys(n for p in tokenized for n in p.spans)
                  if all(n in p.spans for p in tokenized)]
    specs = {"__p__": GraftSpec(name="__p__")}
    for k, u in enumerate(units):
        specs[f"u{k}"] = unit_spec(tuple(u), span_names, name=f"u{k}")
    runs = grafter.run_grid(specs, [p.text for p in tokenized], spans, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        base = float(metric(runs["__p__"].logits.double()))
        return np.array([float(metric(runs[f"u{k}"].logits.double())) - base for k in range(len(units))])


__all__ = ["Attribution", "attribute", "exact_effects", "target_logprob", "target_prob", "logit_diff",
           "recovery_metric", "unit_spec", "unit_label", "group_names", "spearman", "NamedMetric"]
