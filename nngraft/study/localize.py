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
import json
import time
from typing import Any, Sequence

import numpy as np

from ..grafter import Grafter
from ..spec import GraftRule, GraftSpec, Last, Span
from .examples import TestExample
from .localize_result import LocalizeResult
from .localize_search import Search, per_fact_metric  # noqa: F401  (nngraft.study.localize.per_fact_metric)
from .localize_units import (LAST, OTHER, LocalizeError, Metric, metric_label, search_metric, unit_sort_key,
                             units_to_spec)
from .metrics import MIN_GAP, recovery
from .localize_units import group_selectors  # noqa: F401  (nngraft.study.localize.group_selectors, as before)

TARGET_MODES = ("answer", "donor_top1")
SCREENS = ("exhaustive", "attribution")


# ---------------------------------------------------------------------------------------------
# Units, blocks and specs
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


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


def localize(grafter: Grafter, examples: Sequence[TestExample], *, target: float = 0.9, metric: Metric = "prob",
             targets: str | Sequence[int] = "answer", spans: Sequence[str] | None = None,
             include_globals: bool = True, holdout: float = 0.0, seed: int = 0, min_gap: float = MIN_GAP,
             batch_size: int | None = None, name: str = "localized", console: Any = None,
             show_progress: bool = True, screen: str = "exhaustive", screen_steps: int = 1,
             screen_prune: bool = True) -> LocalizeResult:
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
        screen_prune: with ``screen="attribution"``, prune the verified prefix to a 1-minimal set
            (default); ``False`` keeps the smallest verified prefix of the ranking as it is (its
            recovery is still exact, the set not 1-minimal; much cheaper: no knockout per unit).

    Example:
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> ex = [TestExample(f"f{i}", "t", f"{a} stars in a movie alongside", {"first_actor": a}, "Alan")
        ...       for i, a in enumerate(["Ada Lovelace", "Grace Hopper", "Marie Curie"])]
        >>> found = localize(Grafter(P, F, tok), ex, metric="logprob", targets="donor_top1")  # doctest: +SKIP
        >>> found.save("runs/localize")  # spec.json, localize.json, localize.png  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ..util.progress import progress_bar

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
    with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                      TimeElapsedColumn(), console=console, transient=True, disable=not show_progress,
                      tenths=False) as bar:  # off a terminal: each step's line, and one a minute in a long step
        search = Search(grafter, examples, target=target, metric=metric, targets=targets, spans=spans,
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
        while (screen != "attribution" or screen_prune) and search.reduce("prune"):
            pass
        curve = search.curve()
        heldout = search.heldout(curve)
    final = search.current()
    units = sorted(final, key=lambda u: unit_sort_key(u, search.groups))
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
                  "screen": screen, "screen_steps": screen_steps, "screen_prune": screen_prune},
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
