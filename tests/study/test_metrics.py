"""Metrics against hand-computed values: probability, rank, top-k, intervals, recovery, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nngraft.study.metrics import (aggregate, bootstrap_interval, mean_ci, per_fact, recovery, score_logits,
                                   student_t_quantile, t_interval)


def test_prob_rank_and_hits_by_hand():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    z = math.e ** 2 + 2 * math.e + 1
    for target, prob, rank in [(0, math.e ** 2 / z, 0), (1, math.e / z, 1), (2, math.e / z, 1), (3, 1 / z, 3)]:
        s = score_logits(logits, [target], ks=(1, 2, 3))
        assert float(s.prob[0]) == pytest.approx(prob, rel=1e-6)
        assert float(s.logprob[0]) == pytest.approx(math.log(prob), rel=1e-6)
        assert int(s.rank[0]) == rank  # ties (tokens 1 and 2) do not push each other down
        assert [bool(s.hits[k][0]) for k in (1, 2, 3)] == [rank < 1, rank < 2, rank < 3]


def test_batch_rows_are_independent_and_top_tokens_ordered():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    s = score_logits(logits, [2, 0], ks=(1,), n_top=2)
    assert s.prob.tolist() == pytest.approx([0.3, 0.5])
    assert s.rank.tolist() == [1, 0]
    assert s.hits[1].tolist() == [False, True]
    assert s.top_ids.tolist() == [[1, 2], [0, 1]]
    assert s.top_probs[0].tolist() == pytest.approx([0.6, 0.3])


def test_logprob_stays_finite_when_prob_underflows():
    s = score_logits(torch.tensor([[0.0, -1000.0]]), [1])
    assert float(s.prob[0]) == 0.0
    assert float(s.logprob[0]) == pytest.approx(-1000.0)
    assert int(s.rank[0]) == 1


def test_half_precision_logits_are_scored_in_float32():
    logits = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.bfloat16)
    s = score_logits(logits, [1])
    ref = torch.softmax(torch.tensor([3.0, 1.0, 0.0]), -1)[1]
    assert s.prob.dtype == torch.float32
    assert float(s.prob[0]) == pytest.approx(float(ref), rel=1e-6)


def test_score_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 target ids for 1 rows"):
        score_logits(torch.zeros(1, 4), [0, 1])
    with pytest.raises(ValueError, match="out of range for a vocabulary of 4"):
        score_logits(torch.zeros(1, 4), [4])
    with pytest.raises(ValueError, match=r"shape \(batch, vocab\)"):
        score_logits(torch.zeros(4), [0])


@pytest.mark.parametrize("df,p,expected", [(1, 0.975, 12.7062047), (2, 0.975, 4.3026527), (9, 0.975, 2.2621572),
                                           (30, 0.975, 2.0422725), (29, 0.995, 2.7563859), (1000, 0.975, 1.9623391)])
def test_t_quantiles_match_tables(df, p, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert student_t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-6)


def test_t_interval_by_hand():
    # mean 2.5, s = sqrt(5/3), half-width = t(0.975, 3) * s / 2 = 3.182446 * 0.645497
    e = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.1824463 * math.sqrt(5 / 3) / 2
    assert (e.mean, e.n, e.method) == (2.5, 4, "t")
    assert e.low == pytest.approx(2.5 - half, abs=1e-6)
    assert e.high == pytest.approx(2.5 + half, abs=1e-6)


def test_intervals_degenerate_cases():
    for method in ("t", "bootstrap"):
        one = mean_ci([0.3], method=method)
        assert (one.mean, one.low, one.high, one.method) == (0.3, 0.3, 0.3, "none")
        empty = mean_ci([], method=method)
        assert math.isnan(empty.mean) and empty.n == 0
        const = mean_ci([0.2] * 10, method=method)
        assert const.low == pytest.approx(0.2) and const.high == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown interval method 'wald'"):
        mean_ci([1.0, 2.0], method="wald")


def test_bootstrap_is_deterministic_and_close_to_normal_theory():
    values = [0.0, 1.0] * 100  # mean 0.5, standard error 0.5 / sqrt(200) = 0.0354
    a, b = bootstrap_interval(values), bootstrap_interval(values)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.mean == 0.5 and a.method == "bootstrap"
    assert a.low == pytest.approx(0.5 - 1.96 * 0.0354, abs=0.01)
    assert a.high == pytest.approx(0.5 + 1.96 * 0.0354, abs=0.01)
    smooth = np.random.default_rng(0).uniform(0, 1, 50)
    assert bootstrap_interval(smooth, seed=1).low != bootstrap_interval(smooth, seed=0).low  # seed matters


def test_recovery_by_hand():
    r = recovery([0.5, 0.7], [0.1, 0.1], [0.9, 0.9])
    assert r.mean == pytest.approx((0.6 - 0.1) / (0.9 - 0.1))
    below = recovery([0.0, 0.0], [0.2, 0.2], [0.6, 0.6])
    assert below.mean == pytest.approx(-0.5)  # worse than P is negative, not clipped
    above = recovery([1.0, 1.0], [0.2, 0.2], [0.6, 0.6])
    assert above.mean == pytest.approx(2.0)
    # per-fact variation: interval contains the point estimate
    rng = np.random.default_rng(0)
    g, p, f = rng.uniform(0.3, 0.7, 50), rng.uniform(0, 0.1, 50), rng.uniform(0.8, 1, 50)
    r = recovery(g, p, f)
    assert r.mean == pytest.approx((g.mean() - p.mean()) / (f.mean() - p.mean()))
    assert r.low < r.mean < r.high


def test_recovery_undefined_when_f_equals_p():
    r = recovery([0.5, 0.5], [0.30, 0.31], [0.32, 0.33], min_gap=0.05)
    assert math.isnan(r.mean) and math.isnan(r.low)
    assert "F ≈ P" in r.note and "0.020" in r.note
    with pytest.raises(ValueError, match="same facts"):
        recovery([0.1], [0.1, 0.2], [0.3, 0.4])


def _row(spec, fact, template, prob, **extra):
    return dict(model="m", spec=spec, fact_id=fact, template=template, prob=prob, **extra)


def test_per_fact_then_over_facts():
    rows = [_row("g", "a", "t1", 0.2), _row("g", "a", "t2", 0.4), _row("g", "b", "t1", 0.9)]
    assert per_fact(rows, "prob") == pytest.approx({"a": 0.3, "b": 0.9})
    [agg] = aggregate(rows, by=("model", "spec"), metrics=["prob"])
    assert agg.metrics["prob"].mean == pytest.approx(0.6)  # facts weigh equally, not examples (0.5)
    assert (agg.n_facts, agg.n_examples) == (2, 3)


def test_aggregate_groups_hits_and_recovery_per_template():
    rows = []
    for fact, (p, f, g) in enumerate([(0.0, 1.0, 0.5), (0.2, 0.8, 0.2)]):
        for spec, prob, rank in (("p", p, 9), ("f", f, 0), ("g", g, 3)):
            rows.append(_row(spec, str(fact), "t1", prob, rank=rank, top_1=rank < 1, top_5=rank < 5))
    aggs = {a.keys["spec"]: a for a in aggregate(rows)}
    assert list(aggs) == ["p", "f", "g"]
    assert aggs["g"].metrics["top_5"].mean == 1.0 and aggs["g"].metrics["top_1"].mean == 0.0
    assert aggs["f"].metrics["rank"].mean == 0.0
    # (mean g − mean p) / (mean f − mean p) = (0.35 − 0.1) / (0.9 − 0.1)
    assert aggs["g"].recovery.mean == pytest.approx(0.25 / 0.8)
    assert aggs["p"].recovery.mean == pytest.approx(0.0) and aggs["f"].recovery.mean == pytest.approx(1.0)
    table = aggs["g"].to_dict()
    assert table["prob"] == pytest.approx(0.35) and table["recovery"] == pytest.approx(0.3125)
    t_aggs = aggregate(rows, method="t", metrics=["prob"])
    assert t_aggs[2].metrics["prob"].method == "t"


def test_aggregate_without_baselines_has_no_recovery():
    rows = [_row("g", "a", "t", 0.1), _row("g", "b", "t", 0.3)]
    [agg] = aggregate(rows, metrics=["prob"])
    assert agg.recovery is None


# ---------------------------------------------------------------------------------------------
# logit difference and KL: GraftResult and the rows of a sweep, against direct computation
# ---------------------------------------------------------------------------------------------

PROMPTS = ["Ada Lovelace stars in The Engine alongside", "Grace Hopper stars in The Compiler alongside"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
ANSWERS = ["Alan Turing", "Marie Curie"]


def _direct_logits(model, tok, prompt):
    """Next-token logits of a plain forward of ``model`` on ``prompt`` alone (float64)."""
    with torch.no_grad():
        return model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].double()


def _kl_by_hand(p_logits, q_logits):
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    return float((p * (p.log() - q.log())).sum())


def test_graft_result_logit_diff_and_kl_equal_direct_computation():
    from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
    from nngraft.result import target_token_id
    from nngraft.testing import tiny_pair

    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    fe_lt = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])
    graft, p = g.run(fe_lt, PROMPTS, SPANS), g.run(GraftSpec(), PROMPTS, SPANS)
    f = g.run(GraftSpec(rules=[GraftRule(components=["everything"], positions=[{"all": True}])]), PROMPTS, SPANS)
    kl_fg, kl_gp = f.kl_divergence(graft), graft.kl_divergence(p)
    diff_named = graft.logit_diff(ANSWERS, ["Marie", "Alan"])
    diff_top = graft.logit_diff(ANSWERS, baseline=p)
    for i, prompt in enumerate(PROMPTS):
        lp, lf = _direct_logits(P, tok, prompt), _direct_logits(F, tok, prompt)
        lg = graft.logits[i].double()
        assert math.isclose(float(kl_fg[i]), _kl_by_hand(lf, lg), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(float(kl_gp[i]), _kl_by_hand(lg, lp), rel_tol=1e-4, abs_tol=1e-6)
        target = target_token_id(tok, prompt, ANSWERS[i])
        foil = target_token_id(tok, prompt, ["Marie", "Alan"][i])
        assert math.isclose(float(diff_named[i]), float(lg[target] - lg[foil]), abs_tol=1e-5)
        ranked = [int(t) for t in lp.argsort(descending=True) if int(t) != target]  # P's top other token
        assert math.isclose(float(diff_top[i]), float(lg[target] - lg[ranked[0]]), abs_tol=1e-5)
    assert float(p.kl_divergence(p).abs().max()) < 1e-6 and float(kl_gp.min()) > 1e-3
    with pytest.raises(ValueError, match=r"logit_diff needs foils= .* or baseline="):
        graft.logit_diff(ANSWERS)
    with pytest.raises(ValueError, match=r"baseline has logits of shape \(1, \d+\), this result \(2, \d+\)"):
        graft.logit_diff(ANSWERS, baseline=g.run(GraftSpec(), PROMPTS[:1], SPANS[:1]))


@pytest.mark.parametrize("with_baselines", [True, False])
def test_sweep_rows_carry_logit_diff_and_kl_equal_to_direct_computation(with_baselines):
    """Every row's logit_diff / kl_f_graft / kl_graft_p equals direct computation with plain
    forwards of P and F — whether the p / f rows run in earlier batches (batch_size 2 splits an
    example's rows) or the sweep has no baselines and they are computed for the comparison."""
    from nngraft import Grafter
    from nngraft.result import target_token_id
    from nngraft.study.examples import TestExample
    from nngraft.study.grids import paper_specs
    from nngraft.study.sweep import evaluate
    from nngraft.testing import tiny_pair

    P, F, tok = tiny_pair("gpt2")
    specs = paper_specs()
    chosen = [specs["p"], specs["f"], specs["fe"], specs["lt"]] if with_baselines else [specs["fe"], specs["lt"]]
    examples = [TestExample(f"f{i}", "t", prompt, span, answer)
                for i, (prompt, span, answer) in enumerate(zip(PROMPTS, SPANS, ANSWERS))]
    rows = evaluate(Grafter(P, F, tok), chosen, examples, batch_size=3).rows
    assert len(rows) == len(chosen) * len(examples)
    g = Grafter(P, F, tok)
    for row in rows:
        i = int(row["fact_id"][1:])
        prompt = PROMPTS[i]
        lp, lf = _direct_logits(P, tok, prompt), _direct_logits(F, tok, prompt)
        spec = next(s for s in chosen if s.name == row["spec"])
        lg = g.run(spec, [prompt], [SPANS[i]]).logits[0].double()
        target = target_token_id(tok, prompt, ANSWERS[i])
        foil = int(torch.where(torch.arange(lp.numel()) == target, -math.inf, lp).argmax())
        assert row["foil_id"] == foil and row["foil_token"] == tok.decode([foil])
        assert math.isclose(row["logit_diff"], float(lg[target] - lg[foil]), abs_tol=1e-4)
        assert math.isclose(row["kl_f_graft"], _kl_by_hand(lf, lg), rel_tol=1e-3, abs_tol=1e-5)
        assert math.isclose(row["kl_graft_p"], _kl_by_hand(lg, lp), rel_tol=1e-3, abs_tol=1e-5)
