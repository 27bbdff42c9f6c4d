"""Scoring specs on test examples: every (spec, example) unit becomes one results row, rows of
many specs share batched forward passes, each row holds the registered metrics
(:mod:`.metric_registry`) and its recovery against the same example's P and F rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import GraftError
from ..grafter import Grafter
from ..result import target_token_id, top_other_token
from ..spec import GraftSpec
from .examples import TestExample
from .metric_registry import DEFAULT_KS, MetricInputs, get_metric
from .metric_registry import resolve as resolve_metrics
from .metrics import MIN_GAP, score_logits
from .results import ResultsWriter
from .sweep_config import F_SPEC, P_SPEC, ModelPair, SweepConfigError, spec_role


@dataclass
class EvalStats:
    """What one :func:`evaluate` call did."""

    units: int = 0
    skipped: int = 0
    written: int = 0
    batches: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")


def plan_batches(specs: Sequence[GraftSpec], lengths: Sequence[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """All (spec index, example index) units in fixed batches: sorted by prompt length (then
    example, then spec) and cut every ``batch_size`` units. Depends only on the inputs, never on
    which units are already done, so a resumed run batches exactly like an uninterrupted one."""
    units = sorted(((s, e) for s in range(len(specs)) for e in range(len(lengths))),
                   key=lambda u: (lengths[u[1]], u[1], u[0]))
    return [units[i:i + batch_size] for i in range(0, len(units), batch_size)]


def check_spans(specs: Sequence[GraftSpec], examples: Sequence[TestExample]) -> None:
    """Raise if a spec grafts at a span some example does not have (checked before any model is
    loaded, so a long sweep never fails half-way; nothing is silently dropped)."""
    for ex in examples:
        for spec in specs:
            missing = spec.rule_names_span() - set(ex.spans)
            if missing:
                users = [s.name for s in specs if s.rule_names_span() & missing]
                from .grids import SPAN_ROLES

                roles = {name: role for role, name in SPAN_ROLES.items() if name in missing}
                hint = "".join(f"; if your {role} field is another one, name it with --{_ROLE_FLAG[role]} FIELD "
                               f"(in a sweep config: \"spans\": {{\"{role}\": FIELD}})" for role in roles.values())
                raise GraftError(f"example {ex.key!r} has no span {sorted(missing)} (its spans: "
                                 f"{sorted(ex.spans)}), which specs {users} graft at; use a template "
                                 "with those {fields} or leave those specs out" + hint)


_ROLE_FLAG = {"entity": "entity", "title": "title-span", "relation": "relation-span"}


def check_donors(specs: Sequence[GraftSpec], models: Sequence[ModelPair]) -> None:
    """Raise if a spec's rule names a donor (``"donor": NAME``) that some model pair does not
    give in its ``donors`` (checked before any model is loaded)."""
    for pair in models:
        for spec in specs:
            missing = sorted({r.donor for r in spec.rules if r.donor not in (None, "default")} - set(pair.donors))
            if missing:
                raise SweepConfigError(
                    f"spec {spec.name!r} grafts from donor(s) {missing}, but model {pair.name!r} has "
                    f"donors {sorted(pair.donors)}; add them to its \"donors\" (e.g. {{\"{missing[0]}\": PATH}}) "
                    "or leave the spec out")


def evaluate(grafter: Grafter, specs: Sequence[GraftSpec], examples: Sequence[TestExample], *,
             model: str = "model", writer: ResultsWriter | None = None, batch_size: int = 32,
             ks: Sequence[int] = DEFAULT_KS, n_top: int = 10, answer_logprob: bool = False,
             metrics: Sequence[Any] | None = None,
             progress: Callable[[int], None] | None = None) -> EvalStats:
    """Score every spec on every example with ``grafter``; append rows to ``writer`` (skipping
    units it already holds) or, without a writer, return them in ``EvalStats.rows``.

    Spans are located for every example before any forward pass, so a prompt whose span cannot
    be found fails the run up front (nothing is silently dropped). With ``answer_logprob``, rows
    also get the teacher-forced log-probability of the whole answer (:mod:`.answer`).

    ``metrics``: the registered metrics (names, ``module:function``, or callables
    ``fn(logits, inputs)``; :mod:`.metric_registry`) each row stores, besides ``top_k`` for each
    of ``ks``; default :data:`~.metric_registry.DEFAULT_METRICS`.

    Example:
        >>> from nngraft.study.grids import paper_specs
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> ex = TestExample("f1", "t", "Ada Lovelace stars in a movie alongside",
        ...                  {"first_actor": "Ada Lovelace"}, "Alan Turing")
        >>> stats = evaluate(Grafter(P, F, tok), [paper_specs()["p"], paper_specs()["fe"]], [ex])
        >>> [(r["spec"], r["example"]) for r in stats.rows]
        [('p', 'f1/t'), ('fe', 'f1/t')]
    """
    start = time.perf_counter()
    chosen = resolve_metrics(metrics) + [get_metric(f"top_{k}") for k in ks]
    tokenizer = grafter.tokenizer
    tokenized = grafter.tokenize([e.prompt for e in examples], [e.spans for e in examples])
    check_spans(specs, examples)
    targets = [target_token_id(tokenizer, e.prompt, e.answer) for e in examples]
    target_text = [tokenizer.decode([t]) for t in targets]
    target_piece = tokenizer.convert_ids_to_tokens(targets)
    if answer_logprob:
        from .answer import answer_logprobs, answer_token_ids

        answer_ids = [answer_token_ids(tokenizer, e.prompt, e.answer) for e in examples]
    hashes = [s.content_hash() for s in specs]
    roles = [spec_role(s) for s in specs]
    stats = EvalStats(units=len(specs) * len(examples))
    done = writer.done if writer is not None else {}
    baseline: dict[tuple[str, str], float] = {}  # (role, example key) -> prob of this run's p / f row
    for (m, name, key), row in done.items():
        role = next((r for s, r in zip(specs, roles) if s.name == name), None)
        if m == model and role in ("p", "f"):
            baseline[(role, key)] = row["prob"]
    lengths = [len(t) for t in tokenized]
    phases = [[i for i, r in enumerate(roles) if r in ("p", "f")], [i for i, r in enumerate(roles) if r not in ("p", "f")]]
    batches = [[(phase[s], e) for s, e in batch]  # P and F rows first: every other row's recovery needs them
               for phase in phases if phase
               for batch in plan_batches([specs[i] for i in phase], lengths, batch_size)]
    for batch in batches:
        todo = [u for u in batch if (model, specs[u[0]].name, examples[u[1]].key) not in done]
        stats.skipped += len(batch) - len(todo)
        if not todo:
            continue
        extra = baseline_rows(batch, roles)
        result = grafter.run_rows([specs[s] for s, _ in batch] + [P_SPEC if r == "p" else F_SPEC for r, _ in extra],
                                  [tokenized[e] for _, e in batch] + [tokenized[e] for _, e in extra],
                                  batch_size=len(batch) + len(extra))
        logits = result.logits[:len(batch)]
        scores = score_logits(logits, [targets[e] for _, e in batch], ks=(), n_top=n_top)
        inputs = baseline_inputs(logits, result.logits[len(batch):], batch, extra, roles, targets)
        values = {m.name: m.row_values(logits.detach().float().cpu(), inputs) for m in chosen}
        foil = top_other_token(inputs.p_logits, inputs.target_ids)
        if answer_logprob:
            per_token = answer_logprobs(grafter, [specs[s] for s, _ in batch], [tokenized[e] for _, e in batch],
                                        [answer_ids[e] for _, e in batch])
        rows = []
        for j, (s, e) in enumerate(batch):
            if (s, e) not in todo:
                continue
            ex = examples[e]
            row = {
                "model": model, "spec": specs[s].name, "spec_hash": hashes[s], "example": ex.key,
                "fact_id": ex.fact_id, "template": ex.template, "prompt": ex.prompt,
                "answer": ex.answer, "target_id": targets[e], "target_text": target_text[e],
                "target_token": target_piece[e],
                **{name: v[j] for name, v in values.items()},
                "foil_id": int(foil[j]), "foil_token": tokenizer.decode([int(foil[j])]),
            }
            row["top_tokens"] = [tokenizer.decode([int(t)]) for t in scores.top_ids[j]]
            row["top_probs"] = [round(float(p), 6) for p in scores.top_probs[j]]
            if answer_logprob:
                row["answer_logprob"] = sum(per_token[j])
                row["answer_tokens"] = len(per_token[j])
            rows.append(row)
        for (s, e), row in zip([u for u in batch if u in todo], rows):
            if roles[s] in ("p", "f"):
                baseline[(roles[s], examples[e].key)] = row["prob"]
        for (s, e), row in zip([u for u in batch if u in todo], rows):
            key = examples[e].key
            row.update(row_recovery(row["prob"], baseline.get(("p", key)), baseline.get(("f", key))))
        if writer is not None:
            writer.append(rows)
        else:
            stats.rows += rows
        stats.written += len(rows)
        stats.batches += 1
        if progress is not None:
            progress(len(rows))
    stats.seconds = time.perf_counter() - start
    return stats


def baseline_rows(batch: Sequence[tuple[int, int]], roles: Sequence[str]) -> list[tuple[str, int]]:
    """The (role, example) baseline rows a batch adds to its own forward pass: P ("p") and F
    ("f") for every example of the batch whose p / f unit is not in the batch itself. Depends only
    on the batch, never on which units are already done, so a resumed run computes every number
    exactly as an uninterrupted one."""
    present = {(roles[s], e) for s, e in batch if roles[s] in ("p", "f")}
    examples = dict.fromkeys(e for _, e in batch)
    return [(role, e) for role in ("p", "f") for e in examples if (role, e) not in present]


def baseline_inputs(logits: torch.Tensor, extra_logits: torch.Tensor, batch: Sequence[tuple[int, int]],
                    extra: Sequence[tuple[str, int]], roles: Sequence[str], targets: Sequence[int]) -> MetricInputs:
    """Per row of a batch, its target and P's and F's next-token logits on the same example (from
    the batch's own p / f units or its :func:`baseline_rows`): what a metric scores a row against."""
    logits = logits.detach().float().cpu()
    found = {(roles[s], e): logits[j] for j, (s, e) in enumerate(batch) if roles[s] in ("p", "f")}
    found.update({key: extra_logits[i].detach().float().cpu() for i, key in enumerate(extra)})
    rows = [e for _, e in batch]
    ids = torch.tensor([targets[e] for e in rows])
    p = torch.stack([found[("p", e)] for e in rows])
    f = torch.stack([found[("f", e)] for e in rows])
    return MetricInputs(ids, p, f)


def row_recovery(prob: float, p: float | None, f: float | None, *, min_gap: float = MIN_GAP) -> dict[str, Any]:
    """One row's recovery of target probability against the same example's P and F rows of the
    run: ``{"p_prob", "f_prob", "recovery"}`` with recovery = (G − P) / (F − P), ``None`` when
    |F − P| < ``min_gap`` (then it would only amplify noise) or a baseline is not in the run.

    Example:
        >>> row_recovery(0.5, 0.1, 0.9)
        {'p_prob': 0.1, 'f_prob': 0.9, 'recovery': 0.5}
        >>> row_recovery(0.5, 0.1, 0.12)["recovery"] is None
        True
    """
    if p is None or f is None:
        return {"p_prob": p, "f_prob": f, "recovery": None}
    value = (prob - p) / (f - p) if abs(f - p) >= min_gap else None
    return {"p_prob": p, "f_prob": f, "recovery": value}
