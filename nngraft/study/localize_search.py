"""The search behind :func:`nngraft.study.localize.localize`: its steps (positions, then component
families, components and layers, then pruning), each one ``run_grid`` call of candidate unit sets
scored by recovery of the search's metric on the search facts; and the held-out check."""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
import torch

from ..grafter import Grafter
from ..result import target_token_id
from ..spec import COMPONENT_GROUPS, GLOBAL_COMPONENTS, LAYER_COMPONENTS, GraftSpec
from .examples import TestExample
from .metric_registry import MetricInputs
from .metrics import Estimate, recovery
from .localize_result import Candidate, CurvePoint, Step
from .localize_units import (FAMILIES, LAST, OTHER, Block, LocalizeError, Unit, prefix_sizes, rounded, unit_sort_key,
                             metric_label,
                             search_metric, unit_label, units_to_spec)
from .localize_units import group_selectors  # noqa: F401  (nngraft.study.localize.group_selectors, as before)


MAX_EXHAUSTIVE_GROUPS = 5
"""Up to this many position groups, every subset is tried (2^k − 2 candidates in one step)."""


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


class Search:
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
        task = self.progress.add_task(description, total=rows, unit="rows")

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
                 f"[cyan]{step.n_units:>4}[/cyan] units, rec [cyan]{rounded(step.recovery)}[/cyan] │ {decision}")

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
                f"grafting every unit the search may use recovers only {rounded(u_rec)} < target {self.target:g}"
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
        rankings = {"score": sorted(universe, key=lambda u: (-score.get(u, 0.0), unit_sort_key(u, self.groups))),
                    "|score|": sorted(universe, key=lambda u: (-abs(score.get(u, 0.0)), unit_sort_key(u, self.groups)))}
        self.log(f"attribution screen: {n} units scored in {att.seconds:.1f} s "
                 f"({'first order' if steps == 1 else f'integrated, {steps} steps'}), "
                 f"predicted recovery of all: {sum(score.values()):.3f}")
        self.screen_scores = score
        sizes = prefix_sizes(n)
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
        prefix (the full set's is known). After an attribution screen: ordered by attribution
        score, and only the prefixes of sizes 1, 2, 3, 4, 6, 9, … (a few rows, not one per unit)."""
        final = self.current()
        score = getattr(self, "screen_scores", None)
        if score is not None:
            ordered = sorted(final, key=lambda u: (-score.get(u, 0.0), unit_sort_key(u, self.groups)))
            sizes = prefix_sizes(len(ordered))
        else:
            ordered = sorted(final, key=lambda u: (self.cache.get(final - {u}, (None, 0.0, 0.0))[2],
                                                   unit_sort_key(u, self.groups)))
            sizes = list(range(1, len(ordered) + 1))
        prefixes = [frozenset(ordered[:k]) for k in sizes]
        self.evaluate("curve", "curve", [(unit_label(ordered[k - 1]), p) for k, p in zip(sizes, prefixes)])
        self.record("curve", "curve", "recovery of the found set, unit by unit" if score is None else
                    "recovery of the found set, by attribution score")
        self.ordered = ordered
        return [CurvePoint(0, "P", 0.0)] + [CurvePoint(k, unit_label(ordered[k - 1]), self.cache[p][2])
                                           for k, p in zip(sizes, prefixes)]

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
