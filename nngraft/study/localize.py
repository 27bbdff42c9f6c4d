"""Automatic localization: a small set of F's weights that carries the facts.

Given P, F and test examples, :func:`localize` searches (position group × component × layer)
for a small graft set whose **recovery** reaches a target (default 0.9), and returns it as a
:class:`~nngraft.spec.GraftSpec` with the steps that led there (docs/localize.md).

- **Units.** The search space is made of units ``(group, component, layer)``: a position group
  (each named span, e.g. ``first_actor``; ``last``, the last token; ``other``, every other token),
  a component the architecture has (``q``, ``o``, ``up``, …, and the global ``embed``,
  ``lm_head``, … with layer ``None``), and a layer. Grafting every unit is exactly running F.
- **Recovery** of a unit set G is ``(mean_G − mean_P) / (mean_F − mean_P)`` of a per-example
  metric (target probability by default; log-probability or top-1 accuracy), averaged first per
  fact and then over facts (:mod:`nngraft.study.metrics`). Targets are the first token of each
  example's answer, or F's own greedy next token (``targets="donor_top1"``).
- **Search, coarse to fine.** (1) position groups: every non-empty proper subset of groups is
  tried, the smallest one that reaches the target is kept; (2) component families (attention,
  MLP, norms, each global) per kept group; (3) single components; (4) layers by bisection: every
  kept layer range is halved and the halves that are not needed are dropped, until single
  layers; (5) greedy pruning of single units until none can be removed. Each refinement stage
  tries removing every block (one *knockout* candidate per block), then removes, in one go, the
  longest prefix of the removable blocks (least important first) that still reaches the target.
  All candidates of a step are rows of one :meth:`~nngraft.grafter.Grafter.run_grid` call.
- **Guarantee.** The result reaches the target on the search facts and is *1-minimal*: removing
  any single unit drops recovery below the target. It is not guaranteed to be the globally
  smallest such set (that needs exponentially many evaluations).

Example:
    >>> spec = units_to_spec([("last", "up", 1), ("last", "o", 1), ("first_actor", "embed", None)],
    ...                      ["first_actor"], n_layers=2, name="demo")
    >>> [(r.components, r.layers, [p.model_dump(by_alias=True) for p in r.positions]) for r in spec.rules]
    [(['embed'], 'all', [{'span': 'first_actor'}]), (['o', 'up'], [1], [{'last': True}])]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import GraftError
from ..grafter import Grafter
from ..result import target_token_id
from ..spec import (COMPONENT_GROUPS, GLOBAL_COMPONENTS, LAYER_COMPONENTS, All, GraftRule, GraftSpec, Last, Not,
                    Span)
from .examples import TestExample
from .metric_registry import Metric as RegisteredMetric
from .metric_registry import MetricError, MetricInputs, get_metric
from .metrics import MIN_GAP, Estimate, recovery

FORMAT_VERSION = 1

Metric = str
"""A per-example metric whose recovery the search targets (averaged per fact, then over facts): any
registered metric (:mod:`.metric_registry`) that needs no baselines: ``prob`` (default), ``logprob``,
``top1`` (= ``top_1``), ``rank``, or your own."""


def search_metric(name: str) -> RegisteredMetric:
    """The registered metric ``name`` (``top1`` = ``top_1``), if the search can use it."""
    try:
        metric = get_metric(name)
    except MetricError as error:
        raise LocalizeError(str(error)) from None
    if metric.fn is None or metric.baselines:
        raise LocalizeError(f"metric {name!r} cannot steer a search (it is not computed from the grafted model's "
                            "logits alone); use prob, logprob or top1")
    return metric


def metric_label(name: str) -> str:
    """How texts name the search's metric, e.g. 'mean target probability'."""
    return search_metric(name).mean_label

TARGET_MODES = ("answer", "donor_top1")
SCREENS = ("exhaustive", "attribution")
LAST, OTHER = "last", "other"

Unit = tuple[str, str, "int | None"]
"""``(position group, component, layer)``; ``layer`` is ``None`` for global components."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "attn": COMPONENT_GROUPS["attn"],
    "mlp": COMPONENT_GROUPS["mlp"],
    "norms": ("ln_attn", "ln_mlp"),
}
"""Component families tried before single components (global components are their own family)."""

MAX_EXHAUSTIVE_GROUPS = 5
"""Up to this many position groups, every subset is tried (2^k − 2 candidates in one step)."""


class LocalizeError(GraftError, ValueError):
    """The search cannot run or cannot reach its target (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Units, blocks and specs
# ---------------------------------------------------------------------------------------------

_ORDER = {c: i for i, c in enumerate(GLOBAL_COMPONENTS + LAYER_COMPONENTS)}


def _unit_key(unit: Unit, groups: Sequence[str]) -> tuple[int, int, int]:
    group, component, layer = unit
    return (groups.index(group), -1 if layer is None else layer, _ORDER[component])


def _r(value: float) -> str:
    """A recovery with 3 decimals, never "-0.000" (float noise around an exact 0)."""
    return f"{round(value, 3) + 0.0:.3f}"


def unit_label(unit: Unit) -> str:
    """``"first_actor·embed"``, ``"last·o·L3"``."""
    group, component, layer = unit
    return f"{group}·{component}" + ("" if layer is None else f"·L{layer}")


def _layers_label(layers: Sequence[int], n_layers: int) -> str:
    layers = sorted(layers)
    if len(layers) == n_layers:
        return "all layers"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}–{layers[-1]}"
    return "L" + ",".join(map(str, layers))


def _runs(layers: Any) -> str:
    """``[0, 1, 2, 5]`` → ``"0–2, 5"``; other selections as they are."""
    if not isinstance(layers, list):
        return str(layers)
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


@dataclass(frozen=True)
class Block:
    """A product of units the search keeps or drops as a whole: one position group × some
    components × some layers (global components ignore ``layers``)."""

    group: str
    components: tuple[str, ...]
    layers: tuple[int, ...]
    name: str  # the components' name: a family ("mlp"), a component ("up"), or "every component"

    def units(self) -> frozenset[Unit]:
        out: set[Unit] = set()
        for c in self.components:
            if c in GLOBAL_COMPONENTS:
                out.add((self.group, c, None))
            else:
                out.update((self.group, c, layer) for layer in self.layers)
        return frozenset(out)

    def label(self, n_layers: int) -> str:
        has_layers = any(c not in GLOBAL_COMPONENTS for c in self.components)
        where = f"·{_layers_label(self.layers, n_layers)}" if has_layers and self.layers else ""
        return f"{self.group}·{self.name}{where}"


def group_selectors(spans: Sequence[str]) -> dict[str, Any]:
    """The position selector of every group: each span, ``last``, and ``other`` (every token that
    is in no span and is not the last one — written with ``not``, so it means the same whatever
    else a spec grafts)."""
    out: dict[str, Any] = {name: Span(span=name) for name in spans}
    out[LAST] = Last()
    out[OTHER] = Not(**{"not": [Span(span=name) for name in spans] + [Last()]})
    return out


def units_to_spec(units: Sequence[Unit] | frozenset[Unit], spans: Sequence[str], *, n_layers: int,
                  name: str = "localized", description: str | None = None,
                  groups: dict[str, tuple[str, ...]] | None = None) -> GraftSpec:
    """The graft spec that grafts exactly ``units`` (compact: one rule per distinct
    (components, layers), positions merged). ``groups``: component groups to write by name when
    all their members are present (e.g. ``{"mlp": ("gate", "up", "down")}`` for this model)."""
    selectors = group_selectors(spans)
    order = list(spans) + [LAST, OTHER]
    unknown = {u[0] for u in units} - set(order)
    if unknown:
        raise LocalizeError(f"unknown position group(s) {sorted(unknown)}; groups are {order}")
    layers_of: dict[tuple[str, str], list[int]] = {}
    for group, component, layer in sorted(set(units), key=lambda u: _unit_key(u, order)):
        layers_of.setdefault((group, component), [])
        if layer is not None:
            layers_of[(group, component)].append(layer)
    comps_of: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for (group, component), layers in layers_of.items():
        comps_of.setdefault((group, tuple(layers)), []).append(component)
    where_of: dict[tuple[tuple[str, ...], tuple[int, ...]], list[str]] = {}
    for (group, layers), comps in comps_of.items():
        comps = sorted(comps, key=_ORDER.__getitem__)
        where_of.setdefault((tuple(comps), layers), []).append(group)
    rules = []
    for (comps, layers), where in sorted(where_of.items(), key=lambda kv: (
            min(order.index(g) for g in kv[1]), kv[0][1][:1] or (-1,), _ORDER[kv[0][0][0]])):
        names = list(comps)
        for group_name, members in (groups or {}).items():
            if len(members) > 1 and set(members) <= set(names):  # the group, where its first member was
                at = names.index(next(c for c in names if c in members))
                names = [c for c in names[:at] if c not in members] + [group_name] + [
                    c for c in names[at:] if c not in members]
        layer_sel: Any = "all" if not layers or len(layers) == n_layers else list(layers)
        # the groups partition the tokens: all of them together are every token
        positions = ([All()] if set(where) == set(order)
                     else [selectors[g] for g in sorted(where, key=order.index)])
        rules.append(GraftRule(components=names, layers=layer_sel, positions=positions))
    return GraftSpec(name=name, description=description, rules=rules)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One unit set tried in a step: its label, size, metric mean and recovery."""

    label: str
    n_units: int
    recovery: float
    metric: float
    chosen: bool = False
    cached: bool = False


@dataclass
class Step:
    """One search step (one ``run_grid`` call, or none if every candidate was already known).

    ``n_units`` and ``recovery`` describe the kept set *after* the step; ``decision`` says what
    the step changed."""

    index: int
    stage: str
    kind: str
    candidates: list[Candidate]
    forward_passes: int
    rows: int
    n_units: int
    n_blocks: int
    recovery: float
    decision: str


@dataclass
class CurvePoint:
    """The found set grafted in part: its first ``n_units`` units (most important first)."""

    n_units: int
    added: str
    recovery: float
    heldout_recovery: float | None = None


def _estimate_dict(e: Estimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(e).items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class LocalizeResult:
    """What :func:`localize` found, and how. ``save(folder)`` writes ``spec.json`` (the found spec,
    shareable), ``localize.json`` (everything below) and ``localize.png`` (the plot)."""

    spec: GraftSpec
    units: list[Unit]
    recovery: Estimate
    heldout_recovery: Estimate | None
    settings: dict[str, Any]
    baselines: dict[str, Any]
    data: dict[str, Any]
    steps: list[Step]
    curve: list[CurvePoint]
    forward_passes: int
    grid_calls: int
    candidates_evaluated: int
    rows: int
    seconds: float
    universe_units: int
    models: dict[str, Any] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    """P, F, FE+LT and the found set side by side (:func:`compare_with_fe_lt`), for the plot."""

    @property
    def reached(self) -> bool:
        """Whether the found set reaches the target on the search facts."""
        return self.recovery.mean >= self.settings["target"]

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (NaN written as ``null``). ``timing`` is the only
        entry that differs between two runs with the same inputs and seed."""
        return _clean({
            "format": "nngraft.localize",
            "format_version": FORMAT_VERSION,
            "spec": json.loads(self.spec.to_json()),
            "spec_hash": self.spec.content_hash(),
            "units": [list(u) for u in self.units],
            "n_units": len(self.units),
            "universe_units": self.universe_units,
            "reached": self.reached,
            "recovery": _estimate_dict(self.recovery),
            "heldout_recovery": _estimate_dict(self.heldout_recovery),
            "settings": self.settings,
            "baselines": self.baselines,
            "data": self.data,
            "models": self.models,
            "forward_passes": self.forward_passes,
            "grid_calls": self.grid_calls,
            "candidates_evaluated": self.candidates_evaluated,
            "rows": self.rows,
            "steps": [asdict(s) for s in self.steps],
            "curve": [asdict(c) for c in self.curve],
            "comparison": self.comparison,
            "timing": {"seconds": round(self.seconds, 3)},
        })

    def save(self, folder: str | Path, *, plot: bool = True) -> dict[str, Path]:
        """Write ``spec.json``, ``localize.json`` and (with ``plot``) ``localize.png`` into
        ``folder`` (atomically). Returns their paths by kind."""
        from ..util.io import atomic_write_text

        folder = Path(folder)
        paths = {"spec": self.spec.save(folder / "spec.json")}
        data = self.to_dict()
        data["spec_file"] = "spec.json"
        paths["result"] = atomic_write_text(folder / "localize.json", json.dumps(data, indent=2) + "\n")
        if plot:
            from .localize_plot import plot_localize

            paths["plot"] = plot_localize(data, folder / "localize.png")
        return paths

    def summary(self) -> str:
        """A few lines for humans: the spec's rules, recovery, cost."""
        rec = self.recovery
        lines = [f"found {len(self.units)} of {self.universe_units} units, recovery {rec.mean:.3f}"
                 + (f" [{rec.low:.3f}, {rec.high:.3f}]" if rec.method == "bootstrap" and not math.isnan(rec.low)
                    else "")
                 + f" of {metric_label(self.settings['metric'])} (target {self.settings['target']:g})"]
        if self.heldout_recovery is not None:
            h = self.heldout_recovery
            lines.append(f"held-out facts ({h.n}): recovery {_r(h.mean)}"
                         + (f" [{h.low:.3f}, {h.high:.3f}]" if not math.isnan(h.low) else "")
                         + (f" ({h.note})" if h.note else ""))
        for rule in self.spec.rules:
            pos = ", ".join(json.dumps(p.model_dump(by_alias=True)) for p in rule.positions)
            layers = "" if set(rule.components) <= set(GLOBAL_COMPONENTS) else f" @ layers {_runs(rule.layers)}"
            lines.append(f"  {'+'.join(rule.components)}{layers} @ {pos}")
        lines.append(f"{self.forward_passes} forward passes in {self.grid_calls} batched steps, "
                     f"{self.candidates_evaluated} candidate sets, {self.rows} rows, {self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def _check_args(target: float, metric: str, targets: Any, holdout: float, min_gap: float) -> None:
    if not (isinstance(target, (int, float)) and 0.0 < target <= 1.0):
        raise LocalizeError(f"target must be a recovery in (0, 1], e.g. 0.9; got {target!r}")
    search_metric(metric)
    if isinstance(targets, str) and targets not in TARGET_MODES:
        raise LocalizeError(f"unknown targets {targets!r}; use 'answer' (first token of each answer), "
                            "'donor_top1' (F's greedy next token) or a list of token ids")
    if not 0.0 <= holdout < 1.0:
        raise LocalizeError(f"holdout is a fraction of the facts in [0, 1); got {holdout!r}")
    if min_gap < 0:
        raise LocalizeError(f"min_gap must be ≥ 0; got {min_gap!r}")


def _pick_spans(examples: Sequence[TestExample], spans: Sequence[str] | None) -> list[str]:
    if spans is None:
        common = [s for s in examples[0].spans if all(s in e.spans for e in examples)]
        spans = common
    spans = list(dict.fromkeys(spans))
    for reserved in (LAST, OTHER):
        if reserved in spans:
            raise LocalizeError(f"a span may not be called {reserved!r}: that name is the position group "
                                f"of {'the last token' if reserved == LAST else 'every other token'}")
    for ex in examples:
        missing = [s for s in spans if s not in ex.spans]
        if missing:
            raise LocalizeError(f"example {ex.key!r} has no span {missing} (its spans: {sorted(ex.spans)}); "
                                "every example needs every span that is a position group")
    return spans


def split_facts(fact_ids: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(search facts, held-out facts): ``round(holdout · n)`` facts drawn with ``seed``, at least
    one on each side when ``holdout > 0``; both lists sorted.

    Example:
        >>> split_facts(["a", "b", "c", "d"], 0.5, seed=0) == split_facts(["d", "c", "b", "a"], 0.5, seed=0)
        True
    """
    facts = sorted(set(fact_ids))
    if holdout <= 0:
        return facts, []
    if len(facts) < 2:
        raise LocalizeError(f"a held-out split needs at least 2 facts; got {len(facts)}")
    k = min(max(1, round(holdout * len(facts))), len(facts) - 1)
    order = np.random.default_rng(seed).permutation(len(facts))
    held = sorted(facts[i] for i in order[:k])
    return [f for f in facts if f not in set(held)], held


def per_fact_metric(logits: torch.Tensor, target_ids: Any, fact_ids: Sequence[str], metric: str) -> np.ndarray:
    """Per-fact means (facts in sorted order) of ``metric`` (prob, logprob, top1, …: :func:`search_metric`)
    of each row's target token."""
    ids = torch.as_tensor(np.asarray(target_ids), dtype=torch.long).reshape(-1)
    values = search_metric(metric)(logits.detach().float().cpu(), MetricInputs(ids))
    per_example = values.detach().double().numpy()
    names, inverse = np.unique(np.asarray(list(fact_ids), dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=per_example, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    return sums / counts


def compare_with_fe_lt(grafter: Grafter, examples: Sequence[TestExample], result: "LocalizeResult") -> list[dict[str, Any]]:
    """P, F, the paper's FE+LT (all block components at the first span and the last token) and
    the found spec side by side on the search facts, in the search's metric and targets: each
    with the metric's mean and its recovery (G − P) / (F − P). One ``run_grid`` call; stored as
    ``result.comparison`` it becomes the third panel of ``localize.png``.

    Example (after ``result = localize(grafter, examples)``)::

        result.comparison = compare_with_fe_lt(grafter, examples, result)
    """
    from .grids import paper_specs

    search = set(result.data["search_facts"])
    idx = [i for i, e in enumerate(examples) if e.fact_id in search]
    chosen = [examples[i] for i in idx]
    targets = np.asarray(result.data["target_ids"])[idx]
    spans = list(result.settings.get("spans") or [])
    specs = [GraftSpec(name="p"), paper_specs()["f"]]
    label = None
    if spans:
        label = "FE+LT" if spans[0] == "first_actor" else f"{spans[0]}+LT"
        specs.append(GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"],
                                                              positions=[Span(span=spans[0]), Last()])]))
    specs.append(result.spec.model_copy(update={"name": "found"}))
    runs = grafter.run_grid(specs, [e.prompt for e in chosen], [e.spans for e in chosen])
    metric = result.settings["metric"]
    means = {name: float(per_fact_metric(r.logits, targets, [e.fact_id for e in chosen], metric).mean())
             for name, r in runs.items()}
    p, f = means["p"], means["f"]
    out = [{"name": "P", "value": p, "recovery": 0.0}, {"name": "F", "value": f, "recovery": 1.0}]
    if label:
        out.append({"name": label, "value": means["fe_lt"], "recovery": (means["fe_lt"] - p) / (f - p),
                    "spec": json.loads(specs[2].to_json())})
    out.append({"name": "found", "value": means["found"], "recovery": (means["found"] - p) / (f - p),
                "n_units": len(result.units)})
    return out


class _Search:
    def __init__(self, grafter: Grafter, examples: Sequence[TestExample], *, target: float, metric: str,
                 targets: Any, spans: list[str], include_globals: bool, search_idx: list[int],
                 heldout_idx: list[int], seed: int, min_gap: float, batch_size: int | None,
                 log: Any, progress: Any) -> None:
        self.g, self.examples, self.target, self.metric = grafter, list(examples), target, metric
        self.spans, self.seed, self.min_gap, self.batch_size = spans, seed, min_gap, batch_size
        self.log, self.progress = log, progress
        self.search_idx, self.heldout_idx = search_idx, heldout_idx
        self.groups = list(spans) + [LAST, OTHER]
        self.n_layers = grafter.n_layers
        have = grafter.adapter.components
        self.all_globals = [c for c in GLOBAL_COMPONENTS if c in have]
        self.globals = self.all_globals if include_globals else []
        self.families = {f: tuple(c for c in members if c in have) for f, members in FAMILIES.items()}
        self.families = {f: m for f, m in self.families.items() if m}
        self.block_components = [c for c in LAYER_COMPONENTS if c in have]
        self.spec_groups = {g: tuple(c for c in COMPONENT_GROUPS[g] if c in have) for g in ("attn", "mlp")}
        self.targets_mode = targets if isinstance(targets, str) else "ids"
        self.target_ids = np.full(len(self.examples), -1, dtype=np.int64)
        if self.targets_mode == "answer":
            tok = grafter.tokenizer
            self.target_ids[:] = [target_token_id(tok, e.prompt, e.answer) for e in self.examples]
        elif self.targets_mode == "ids":
            ids = list(targets)
            if len(ids) != len(self.examples):
                raise LocalizeError(f"{len(ids)} target ids for {len(self.examples)} examples")
            self.target_ids[:] = ids
        self.steps: list[Step] = []
        self.cache: dict[frozenset, tuple[np.ndarray, float, float]] = {}
        self.forward_passes = self.grid_calls = self.candidates = self.rows = 0
        self.blocks: list[Block] = []
        self.cur_rec = math.nan
        self.p_values = self.f_values = None

    # -- evaluation ----------------------------------------------------------------------------

    def _spec(self, units: frozenset[Unit], name: str) -> GraftSpec:
        if not units:
            return GraftSpec(name=name)
        return units_to_spec(units, self.spans, n_layers=self.n_layers, name=name, groups=self.spec_groups)

    def _values(self, logits: torch.Tensor, idx: list[int]) -> np.ndarray:
        """Per-fact means of the metric for rows ``idx`` (facts in sorted order)."""
        return per_fact_metric(logits, self.target_ids[idx], [self.examples[i].fact_id for i in idx], self.metric)

    def _ratio(self, values: np.ndarray, p: np.ndarray, f: np.ndarray) -> float:
        return float((values.mean() - p.mean()) / (f.mean() - p.mean()))

    def _run(self, specs: list[GraftSpec], idx: list[int], description: str) -> dict[str, Any]:
        examples = [self.examples[i] for i in idx]
        rows = len(specs) * len(examples)
        task = self.progress.add_task(description, total=rows)

        def advance(n: int) -> None:
            self.forward_passes += 1
            self.progress.advance(task, n)

        before = self.forward_passes
        results = self.g.run_grid(specs, [e.prompt for e in examples], [e.spans for e in examples],
                                  batch_size=self.batch_size, progress=advance)
        self.progress.remove_task(task)
        self.grid_calls += 1
        self.rows += rows
        self._last_forwards = self.forward_passes - before
        return results

    def evaluate(self, stage: str, kind: str, candidates: list[tuple[str, frozenset[Unit]]]) -> list[float]:
        """Recovery of each candidate unit set on the search facts (new sets in one run_grid)."""
        new = list(dict.fromkeys(units for _, units in candidates if units not in self.cache))
        self._last_forwards, rows = 0, 0
        if new:
            specs = [self._spec(units, f"c{i}") for i, units in enumerate(new)]
            results = self._run(specs, self.search_idx, f"step {len(self.steps) + 1}: {stage} ({kind})")
            rows = len(specs) * len(self.search_idx)
            self.candidates += len(new)
            for units, spec in zip(new, specs):
                values = self._values(results[spec.name].logits, self.search_idx)
                self.cache[units] = (values, float(values.mean()), self._ratio(values, self.p_values, self.f_values))
        self._pending = [Candidate(label, len(units), self.cache[units][2], self.cache[units][1],
                                   cached=units not in new) for label, units in candidates]
        self._pending_rows = rows
        return [c.recovery for c in self._pending]

    def record(self, stage: str, kind: str, decision: str) -> None:
        step = Step(len(self.steps) + 1, stage, kind, self._pending, self._last_forwards, self._pending_rows,
                    len(self.current()), len(self.blocks), self.cur_rec, decision)
        self.steps.append(step)
        fresh = sum(not c.cached for c in step.candidates)
        self.log(f"[bold]{step.index:>2}[/bold] {stage:<10} {kind:<9} {fresh:>3} sets {step.forward_passes:>3} fwd │ "
                 f"[cyan]{step.n_units:>4}[/cyan] units, rec [cyan]{_r(step.recovery)}[/cyan] │ {decision}")

    def current(self) -> frozenset[Unit]:
        return frozenset().union(*(b.units() for b in self.blocks)) if self.blocks else frozenset()

    # -- stages --------------------------------------------------------------------------------

    def baselines(self) -> dict[str, Any]:
        from .grids import paper_specs

        universe = self._universe_blocks()
        units = frozenset().union(*(b.units() for b in universe))
        specs = [GraftSpec(name="p"), paper_specs()["f"], self._spec(units, "universe")]
        results = self._run(specs, self.search_idx, "step 1: baselines (P, F, every unit)")
        if self.targets_mode == "donor_top1":
            self.target_ids[self.search_idx] = results["f"].logits.float().argmax(-1).cpu().numpy()
        self.p_values = self._values(results["p"].logits, self.search_idx)
        self._p_logits, self._f_logits = results["p"].logits, results["f"].logits
        self.f_values = self._values(results["f"].logits, self.search_idx)
        p_mean, f_mean = float(self.p_values.mean()), float(self.f_values.mean())
        gap = f_mean - p_mean
        if abs(gap) < self.min_gap:
            raise LocalizeError(
                f"F ≈ P on {metric_label(self.metric)}: P = {p_mean:.4f}, F = {f_mean:.4f} (|F − P| = {abs(gap):.4f} "
                f"< min_gap {self.min_gap:g}), so recovery means nothing and there is nothing to localize. "
                "Check that F was finetuned on these facts; or try targets='donor_top1', metric='logprob', "
                "or a smaller min_gap")
        self.candidates += 3
        self.cache[frozenset()] = (self.p_values, p_mean, 0.0)
        u_values = self._values(results["universe"].logits, self.search_idx)
        u_rec = self._ratio(u_values, self.p_values, self.f_values)
        self.cache[units] = (u_values, float(u_values.mean()), u_rec)
        everything = len(self.groups) * (len(self.all_globals) + len(self.block_components) * self.n_layers)
        self._pending = [Candidate("P (no graft)", 0, 0.0, p_mean), Candidate("F (everything)", everything, 1.0, f_mean),
                         Candidate("every unit", len(units), u_rec, float(u_values.mean()), chosen=True)]
        self._pending_rows = 3 * len(self.search_idx)
        self.blocks, self.cur_rec = universe, u_rec
        self.record("baselines", "baselines", f"P = {p_mean:.4f}, F = {f_mean:.4f}")
        if u_rec < self.target:
            raise LocalizeError(
                f"grafting every unit the search may use recovers only {_r(u_rec)} < target {self.target:g}"
                + ("" if self.globals else " (global components are excluded: allow them, or lower the target)"))
        return {"p": p_mean, "f": f_mean, "universe_recovery": u_rec, "n_facts": len(self.p_values)}

    def screen(self, steps: int) -> None:
        """Attribution screen (``screen="attribution"``): score every unit of the search space by
        its attribution to the linearized recovery (:mod:`nngraft.attribution`; integrated along
        P → F with ``steps > 1``), then verify with exact grafts: the recovery of growing prefixes
        of two rankings (by score, and by |score|: a unit that hurts alone may be needed with
        others; sizes 1, 2, 3, 4, 6, 9, 13, …) in one step, the smallest prefix reaching the
        target refined between its size and the one before, and kept as single-unit blocks for
        the greedy pruning that follows (the result is exact and 1-minimal as always)."""
        from ..attribution import attribute, recovery_metric

        idx = self.search_idx
        examples = [self.examples[i] for i in idx]
        facts = [e.fact_id for e in examples]
        counts = {f: facts.count(f) for f in facts}
        weights = [1.0 / (len(counts) * counts[f]) for f in facts]  # per fact, then over facts
        base = "logprob" if self.metric == "logprob" else "prob"  # top1 is screened by its probability
        p_mean, f_mean = float(self.p_values.mean()), float(self.f_values.mean())
        if self.metric == "top1":
            from ..attribution import target_prob

            with torch.no_grad():
                p_mean = float(target_prob(self.target_ids[idx], weights)(self._p_logits))
                f_mean = float(target_prob(self.target_ids[idx], weights)(self._f_logits))
        metric = recovery_metric(self.target_ids[idx], p_mean, f_mean, weights, base=base)
        universe = self.current()
        comps = list(dict.fromkeys(c for _, c, _ in universe))
        att = attribute(self.g, metric, [e.prompt for e in examples], [e.spans for e in examples],
                        components=comps, steps=steps, batch_size=self.batch_size or self.g.batch_size,
                        position_spans=self.spans)
        self.attribution = att
        values = att.integrated if att.integrated is not None else att.scores
        score = {u: float(v) for u, v in zip(att.units, values)}
        n = len(universe)
        # two rankings: by score (what helps most first) and by |score| (a unit that hurts alone
        # may be needed together with others); both rankings' prefixes are verified in one step
        rankings = {"score": sorted(universe, key=lambda u: (-score.get(u, 0.0), _unit_key(u, self.groups))),
                    "|score|": sorted(universe, key=lambda u: (-abs(score.get(u, 0.0)), _unit_key(u, self.groups)))}
        self.log(f"attribution screen: {n} units scored in {att.seconds:.1f} s "
                 f"({'first order' if steps == 1 else f'integrated, {steps} steps'}), "
                 f"predicted recovery of all: {sum(score.values()):.3f}")
        sizes, k = [], 1
        while k < n:
            sizes.append(k)
            k = max(k + 1, int(k * 1.5))
        sizes.append(n)
        cands = [(f"top {k} by {how}", frozenset(ranked[:k])) for how, ranked in rankings.items() for k in sizes]
        recs = self.evaluate("screen", "prefixes", cands)
        best_of = {}
        for j, how in enumerate(rankings):
            ok = [i for i in range(len(sizes)) if recs[j * len(sizes) + i] >= self.target]
            best_of[how] = ok[0] if ok else len(sizes) - 1
        how = min(rankings, key=lambda h: (sizes[best_of[h]], list(rankings).index(h)))
        best, ranked = best_of[how], rankings[how]
        self._pending[list(rankings).index(how) * len(sizes) + best].chosen = True
        self.blocks = [Block(g, (c,), () if layer is None else (layer,), c) for g, c, layer in ranked[:sizes[best]]]
        self.cur_rec = recs[list(rankings).index(how) * len(sizes) + best]
        self.record("screen", "prefixes", f"keep the top {sizes[best]} of {n} by {how}")
        lo, hi = (sizes[best - 1] if best else 0), sizes[best]
        while hi - lo > 1:  # refine the size: at most 8 sizes between lo and hi per step
            inner = sorted(set(np.linspace(lo, hi, 10)[1:-1].round().astype(int).tolist()) - {lo, hi})
            if not inner:
                break
            recs = self.evaluate("screen", "sizes", [(f"top {k} by {how}", frozenset(ranked[:k])) for k in inner])
            passing = [k for k, r in zip(inner, recs) if r >= self.target]
            if passing:
                hi = passing[0]
                self._pending[inner.index(hi)].chosen = True
                lo = max([k for k in inner if k < hi], default=lo)
                self.blocks = [Block(g, (c,), () if layer is None else (layer,), c) for g, c, layer in ranked[:hi]]
                self.cur_rec = self.cache[frozenset(ranked[:hi])][2]
            else:
                lo = inner[-1]
            self.record("screen", "sizes", f"keep the top {hi} by {how}")

    def _universe_blocks(self) -> list[Block]:
        comps = tuple(self.globals) + tuple(self.block_components)
        return [Block(g, comps, tuple(range(self.n_layers)), "every component") for g in self.groups]

    def positions(self) -> None:
        groups = [b.group for b in self.blocks]
        if len(groups) > MAX_EXHAUSTIVE_GROUPS:
            self.reduce("positions")
            return
        by_group = {b.group: b for b in self.blocks}
        subsets = [c for r in range(1, len(groups)) for c in itertools.combinations(groups, r)]
        if not subsets:
            return
        cands = [("+".join(s), frozenset().union(*(by_group[g].units() for g in s))) for s in subsets]
        recs = self.evaluate("positions", "subsets", cands)
        ok = [i for i, r in enumerate(recs) if r >= self.target]
        if ok:
            best = min(ok, key=lambda i: (len(subsets[i]), -recs[i], i))
            self._pending[best].chosen = True
            self.blocks = [by_group[g] for g in subsets[best]]
            self.cur_rec = recs[best]
            decision = f"keep {'+'.join(subsets[best])}"
        else:
            decision = "no proper subset reaches the target: keep every group"
        self.record("positions", "subsets", decision)

    def split(self, how: str) -> bool:
        """Refine every block one level (``families``, ``components`` or ``layers``)."""
        out: list[Block] = []
        for b in self.blocks:
            if how == "families" and b.name == "every component":
                out += [Block(b.group, (c,), (), c) for c in b.components if c in GLOBAL_COMPONENTS]
                out += [Block(b.group, m, b.layers, f) for f, m in self.families.items()]
            elif how == "components" and len(b.components) > 1:
                out += [Block(b.group, (c,), b.layers if c not in GLOBAL_COMPONENTS else (), c) for c in b.components]
            elif how == "layers" and len(b.layers) > 1:
                half = len(b.layers) // 2
                out += [Block(b.group, b.components, b.layers[:half], b.name),
                        Block(b.group, b.components, b.layers[half:], b.name)]
            else:
                out.append(b)
        changed = out != self.blocks
        self.blocks = out
        return changed

    def reduce(self, stage: str) -> bool:
        """One knockout round, then the longest removable prefix. Returns whether a block went."""
        if len(self.blocks) < 2:
            return False
        labels = [b.label(self.n_layers) for b in self.blocks]
        units = [b.units() for b in self.blocks]
        current = self.current()
        cands = [(f"− {labels[i]}", current - units[i]) for i in range(len(self.blocks))]
        recs = self.evaluate(stage, "knockouts", cands)
        fresh = any(not c.cached for c in self._pending)
        removable = sorted((i for i, r in enumerate(recs) if r >= self.target), key=lambda i: (-recs[i], i))
        if not removable:
            for c in self._pending:
                c.chosen = False
            if fresh:
                self.record(stage, "knockouts", "every block is needed")
            return False
        if len(removable) == 1:
            j, rec = 1, recs[removable[0]]
            self._pending[removable[0]].chosen = True
            self.record(stage, "knockouts", f"drop {labels[removable[0]]}")
        else:
            self.record(stage, "knockouts", f"{len(removable)} blocks could go alone")
            knockouts = self._pending
            prefixes = [(" ".join(f"− {labels[i]}" for i in removable[:k]) if k <= 3
                         else f"− {k} least needed blocks",
                         current - frozenset().union(*(units[i] for i in removable[:k])))
                        for k in range(2, len(removable) + 1)]
            prefix_recs = self.evaluate(stage, "prefixes", prefixes)
            j, rec = 1, recs[removable[0]]
            for k, r in enumerate(prefix_recs, start=2):
                if r >= self.target:
                    j, rec = k, r
            if j >= 2:
                self._pending[j - 2].chosen = True
            else:
                knockouts[removable[0]].chosen = True
        gone = set(removable[:j])
        self.blocks = [b for i, b in enumerate(self.blocks) if i not in gone]
        self.cur_rec = rec
        if len(removable) > 1:
            shown = ", ".join(labels[i] for i in removable[:min(j, 3)]) + (" …" if j > 3 else "")
            self.record(stage, "prefixes", f"drop {j}: {shown}")
        return True

    def curve(self) -> list[CurvePoint]:
        """Units ordered by how much removing each alone hurts (most first); recovery of every
        prefix (the full set's is known)."""
        final = self.current()
        ordered = sorted(final, key=lambda u: (self.cache.get(final - {u}, (None, 0.0, 0.0))[2],
                                               _unit_key(u, self.groups)))
        prefixes = [frozenset(ordered[:k]) for k in range(1, len(ordered) + 1)]
        self.evaluate("curve", "curve", [(unit_label(ordered[k - 1]), p) for k, p in enumerate(prefixes, 1)])
        self.record("curve", "curve", "recovery of the found set, unit by unit")
        self.ordered = ordered
        return [CurvePoint(0, "P", 0.0)] + [CurvePoint(k, unit_label(u), self.cache[p][2])
                                           for k, (u, p) in enumerate(zip(ordered, prefixes), 1)]

    def heldout(self, curve: list[CurvePoint]) -> Estimate | None:
        if not self.heldout_idx:
            return None
        from .grids import paper_specs

        prefixes = [frozenset(self.ordered[:k]) for k in range(1, len(self.ordered) + 1)]
        specs = [GraftSpec(name="p"), paper_specs()["f"]] + [self._spec(p, f"k{k}") for k, p in enumerate(prefixes, 1)]
        results = self._run(specs, self.heldout_idx, "held-out facts")
        if self.targets_mode == "donor_top1":
            self.target_ids[self.heldout_idx] = results["f"].logits.float().argmax(-1).cpu().numpy()
        p = self._values(results["p"].logits, self.heldout_idx)
        f = self._values(results["f"].logits, self.heldout_idx)
        values = [self._values(results[f"k{k}"].logits, self.heldout_idx) for k in range(1, len(prefixes) + 1)]
        gap_ok = abs(f.mean() - p.mean()) >= self.min_gap
        curve[0].heldout_recovery = 0.0 if gap_ok else math.nan
        for point, v in zip(curve[1:], values):
            point.heldout_recovery = self._ratio(v, p, f) if gap_ok else math.nan
        est = recovery(values[-1], p, f, min_gap=self.min_gap, seed=self.seed)
        self.log(f"held-out facts ({len(p)}): P = {p.mean():.4f}, F = {f.mean():.4f}, found set: recovery "
                 f"{est}")
        self.heldout_baselines = {"p": float(p.mean()), "f": float(f.mean()), "n_facts": len(p)}
        return est


def localize(grafter: Grafter, examples: Sequence[TestExample], *, target: float = 0.9, metric: Metric = "prob",
             targets: str | Sequence[int] = "answer", spans: Sequence[str] | None = None,
             include_globals: bool = True, holdout: float = 0.0, seed: int = 0, min_gap: float = MIN_GAP,
             batch_size: int | None = None, name: str = "localized", console: Any = None,
             show_progress: bool = True, screen: str = "exhaustive", screen_steps: int = 1) -> LocalizeResult:
    """Search for a small, 1-minimal set of F's weights (position group × component × layer) whose
    recovery of ``metric`` reaches ``target`` on ``examples`` (see the module docstring).

    Args:
        grafter: P with donor F.
        examples: test examples (prompt, spans, answer, fact_id); a fact seen through several
            templates counts once.
        target: recovery to reach, in (0, 1]; 0.9 means 90 % of the way from P to F.
        metric: ``"prob"`` (target probability, default), ``"logprob"`` or ``"top1"``.
        targets: ``"answer"`` (first token of each answer), ``"donor_top1"`` (F's greedy next
            token for each prompt; useful when F is not trained on the answers, e.g. random
            models) or one token id per example.
        spans: the span names that are position groups (default: every span all examples have).
        include_globals: also search the embeddings, final norm and LM head (then grafting every
            unit is exactly F).
        holdout: fraction of facts kept out of the search and used only to report the found
            set's recovery (drawn with ``seed``).
        seed: the held-out split and the bootstrap of the confidence intervals.
        min_gap: smallest ``|mean_F − mean_P|`` for which recovery is defined (else an error).
        batch_size: rows per forward pass (default: the grafter's).
        name: the found spec's name.
        console: a rich console for the step log and progress (default: stderr).
        screen: ``"exhaustive"`` (the coarse-to-fine search above) or ``"attribution"``: rank
            every unit by its attribution score (:mod:`nngraft.attribution`, one forward and one
            backward pass), verify growing prefixes of the ranking with exact grafts, then prune
            as always (docs/attribution.md).
        screen_steps: with ``screen="attribution"``, 1 for first-order scores, more for scores
            integrated along P → F with that many points.

    Example:
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> ex = [TestExample(f"f{i}", "t", f"{a} stars in a movie alongside", {"first_actor": a}, "Alan")
        ...       for i, a in enumerate(["Ada Lovelace", "Grace Hopper", "Marie Curie"])]
        >>> found = localize(Grafter(P, F, tok), ex, metric="logprob", targets="donor_top1")  # doctest: +SKIP
        >>> found.save("runs/localize")  # spec.json, localize.json, localize.png  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    _check_args(target, metric, targets, holdout, min_gap)
    if screen not in SCREENS:
        raise LocalizeError(f"unknown screen {screen!r}; use one of {', '.join(SCREENS)}")
    if not isinstance(screen_steps, int) or isinstance(screen_steps, bool) or screen_steps < 1:
        raise LocalizeError(f"screen_steps must be a whole number ≥ 1; got {screen_steps!r}")
    examples = list(examples)
    if not examples:
        raise LocalizeError("no test examples to localize on")
    keys = [e.key for e in examples]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise LocalizeError(f"example {dup!r} (fact_id/template) occurs twice")
    spans = _pick_spans(examples, spans)
    grafter.tokenize([e.prompt for e in examples], [e.spans for e in examples])  # every span locatable
    search_facts, held_facts = split_facts([e.fact_id for e in examples], holdout, seed)
    held = set(held_facts)
    search_idx = [i for i, e in enumerate(examples) if e.fact_id not in held]
    heldout_idx = [i for i, e in enumerate(examples) if e.fact_id in held]
    console = console or Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not show_progress) as bar:
        search = _Search(grafter, examples, target=target, metric=metric, targets=targets, spans=spans,
                         include_globals=include_globals, search_idx=search_idx, heldout_idx=heldout_idx,
                         seed=seed, min_gap=min_gap, batch_size=batch_size,
                         log=bar.console.print, progress=bar)
        bar.console.print(f"[bold]nngraft localize[/bold]: {len(search_facts)} facts ({len(search_idx)} examples)"
                          + (f", {len(held_facts)} held out" if held_facts else "")
                          + f"; groups {search.groups}; target recovery {target:g} of {metric_label(metric)}")
        baselines = search.baselines()
        if screen == "attribution":
            search.screen(screen_steps)
        else:
            search.positions()
            for stage in ("families", "components"):
                if search.split(stage):
                    search.reduce(stage)
            rounds = 0
            while search.split("layers"):
                rounds += 1
                search.reduce(f"layers {rounds}")
        while search.reduce("prune"):
            pass
        curve = search.curve()
        heldout = search.heldout(curve)
    final = search.current()
    units = sorted(final, key=lambda u: _unit_key(u, search.groups))
    values = search.cache[final][0]
    est = recovery(values, search.p_values, search.f_values, min_gap=min_gap, seed=seed)
    description = (f"found by nngraft localize: {len(units)} units, recovery {est.mean:.3f} of "
                   f"{metric_label(metric)} (target {target:g}, targets={search.targets_mode}) over "
                   f"{len(search_facts)} facts")
    spec = units_to_spec(units, spans, n_layers=search.n_layers, name=name, description=description,
                         groups=search.spec_groups)
    if held_facts:
        baselines["heldout"] = search.heldout_baselines
    if screen == "attribution":
        att = search.attribution
        data_screen = {"attribution_seconds": round(att.seconds, 3), "units_scored": len(att.units),
                       "top": att.table(10)}
    fact_blob = json.dumps(sorted((e.key, e.prompt, e.answer) for e in examples)).encode()
    result = LocalizeResult(
        spec=spec, units=units, recovery=est, heldout_recovery=heldout,
        settings={"target": target, "metric": metric, "targets": search.targets_mode, "spans": spans,
                  "groups": search.groups, "include_globals": include_globals, "holdout": holdout,
                  "seed": seed, "min_gap": min_gap, "batch_size": batch_size or grafter.batch_size,
                  "n_layers": search.n_layers, "model_type": grafter.adapter.model_type,
                  "screen": screen, "screen_steps": screen_steps},
        baselines=baselines,
        data={"n_examples": len(examples), "n_facts": len(search_facts) + len(held_facts),
              "search_facts": search_facts, "heldout_facts": held_facts,
              "examples_hash": hashlib.sha256(fact_blob).hexdigest()[:16],
              "target_ids": [int(t) for t in search.target_ids],
              **({"screen": data_screen} if screen == "attribution" else {})},
        steps=search.steps, curve=curve, forward_passes=search.forward_passes, grid_calls=search.grid_calls,
        candidates_evaluated=search.candidates, rows=search.rows, seconds=time.perf_counter() - start,
        universe_units=len(frozenset().union(*(b.units() for b in search._universe_blocks()))))
    return result
