"""The attribution pass: every unit of the graft space scored from one forward and one backward
pass of P (:func:`attribute`; the method is explained in :mod:`nngraft.attribution`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..arch import stores_weight_in_out
from ..backends.local import swapped_parameters
from ..compile.tokens import pad_left
from ..errors import ArgumentError
from ..spec import GLOBAL_COMPONENTS
from .metrics import Metric
from .result import Attribution
from .units import Unit, group_masks, group_names

HEAD_COMPONENTS = ("q", "k", "v", "o")
NEURON_COMPONENTS = ("gate", "up", "down")



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
