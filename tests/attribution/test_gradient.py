"""Graft attribution (nngraft.attribution): the score of every unit is the exact first-order
effect of grafting it, checked against finite differences of real grafts on every tiny
architecture; heads and neurons split it exactly; the integrated scores add up to the path's end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nngraft import Grafter, GraftRule, GraftSpec, Last
from nngraft.attribution import (Attribution, exact_effects, group_masks, logit_diff, recovery_metric, spearman,
                                 target_logprob, target_prob, unit_spec)
from nngraft.donors.donor import TensorDonor
from nngraft.errors import ArgumentError
from nngraft.testing import TINY_MODEL_TYPES, tiny_pair
from tests.helpers import ROOT

PROMPT = ["Ada Lovelace stars in a movie alongside"]
SPANS = [{"actor": "Ada Lovelace"}]
PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper appears in The Compiler"]
SPANS2 = [{"actor": "Ada Lovelace"}, {"actor": "Grace Hopper"}]


def _scaled(P, F, eps: float) -> TensorDonor:
    """The donor P + eps·(F − P) (every parameter)."""
    f = dict(F.named_parameters())
    return TensorDonor({n: p.detach() + eps * (f[n].detach() - p.detach()) for n, p in P.named_parameters()})


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_scores_equal_the_finite_difference_of_real_grafts(model_type):
    """For every unit (span / last / other × every component × layer), the score equals
    (m(graft with P + ε·ΔW) − m(graft with P − ε·ΔW)) / 2ε, the derivative of the exact graft's
    effect along F − P, in float64. (Tolerance: the Llama-family norms compute in float32 inside.)"""
    P, F, tok = tiny_pair(model_type)
    P, F = P.double(), F.double()
    metric = target_logprob([5])
    att = Grafter(P, F, tok).attribute(metric, PROMPT, SPANS)
    assert att.groups == ["actor", "last", "other"]
    n_comps = len(Grafter(P, F, tok).adapter.components)
    assert len(att.units) == 3 * sum(1 if c in ("embed", "pos_embed", "ln_final", "lm_head") else 2
                                     for c in Grafter(P, F, tok).adapter.components) and n_comps > 5
    eps = 1e-2
    up = exact_effects(Grafter(P, _scaled(P, F, eps), tok), metric, PROMPT, SPANS, att.units)
    down = exact_effects(Grafter(P, _scaled(P, F, -eps), tok), metric, PROMPT, SPANS, att.units)
    fd = (up - down) / (2 * eps)
    scale = np.abs(att.scores).max()
    assert scale > 1e-3  # the units do move the metric
    np.testing.assert_allclose(att.scores, fd, rtol=0, atol=3e-4 * scale)
    # a unit that cannot change the last token's logits scores 0: the LM head off the last token
    if "lm_head" in Grafter(P, F, tok).adapter.components:
        assert att.score(("other", "lm_head", None)) == 0.0 and att.score(("actor", "lm_head", None)) == 0.0


def test_padding_and_chunks_do_not_change_scores():
    """Prompts of different lengths (left padding) in one batch or one per chunk: the score of a
    batch of two is the mean of each prompt's own (the metric is a mean)."""
    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    both = g.attribute(target_logprob([5, 7]), PROMPTS, SPANS2)
    chunked = g.attribute(target_logprob([5, 7]), PROMPTS, SPANS2, batch_size=1)
    one = g.attribute(target_logprob([5]), PROMPTS[:1], SPANS2[:1])
    two = g.attribute(target_logprob([7]), PROMPTS[1:], SPANS2[1:])
    np.testing.assert_allclose(both.scores, (one.scores + two.scores) / 2, atol=1e-5)
    np.testing.assert_allclose(chunked.scores, both.scores, atol=1e-5)
    assert abs(both.metric_p - (one.metric_p + two.metric_p) / 2) < 1e-5


def test_group_masks_partition_the_real_tokens():
    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    prompts = g.tokenize(PROMPTS, SPANS2)
    width = max(len(p) for p in prompts)
    masks = group_masks(prompts, ["actor"], width)
    total = sum(m.long() for m in masks.values())
    for row, p in enumerate(prompts):
        assert total[row, :width - len(p)].sum() == 0  # padding is in no group
        assert (total[row, width - len(p):] == 1).all()  # every real token in exactly one group
        assert masks["last"][row].nonzero().flatten().tolist() == [width - 1]
        assert masks["actor"][row].nonzero().flatten().tolist() == [width - len(p) + i for i in p.spans["actor"]]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_heads_and_neurons_split_the_score_exactly(model_type):
    """Per-head (q, k, v, o) and per-neuron (gate, up, down) scores: their sum (plus o's / down's
    bias change) is the unit's score, and one head's score is the finite difference of grafting
    that head alone (a spec with ``"weights": {"heads": [h]}``)."""
    P, F, tok = tiny_pair(model_type)
    P, F = P.double(), F.double()
    metric = target_logprob([5])
    g = Grafter(P, F, tok)
    att = g.attribute(metric, PROMPT, SPANS, heads=True, neurons=True)
    comps = g.adapter.components
    head_comps = [c for c in ("q", "k", "v", "o") if c in comps and not (g.adapter.fused_qkv and c != "o")]
    neuron_comps = [c for c in ("gate", "up", "down") if c in comps]
    assert {u[1] for u in att.heads} == set(head_comps)
    assert {u[1] for u in att.neurons} == set(neuron_comps)
    for unit, per_head in att.heads.items():
        if unit[1] != "o" or model_type == "llama":  # GPT-2's o has a bias: not part of any head
            assert per_head.sum() == pytest.approx(att.score(unit), abs=1e-9)
    for unit, per_neuron in att.neurons.items():
        assert len(per_neuron) == P.config.intermediate_size if model_type == "llama" else 4 * 32
        if unit[1] != "down" or model_type == "llama":
            assert per_neuron.sum() == pytest.approx(att.score(unit), abs=1e-9)
    eps = 1e-2
    for unit in [("last", "o", 1), ("actor", "o", 0)] + ([("last", "q", 1)] if model_type == "llama" else []):
        h = int(np.argmax(np.abs(att.heads[unit])))
        spec = unit_spec(unit, ["actor"]).model_dump(by_alias=True)
        spec["rules"][0]["weights"] = {"heads": [h]}
        values = []
        for sign in (1, -1):
            r = Grafter(P, _scaled(P, F, sign * eps), tok).run_grid({"p": GraftSpec(name="p"), "h": spec},
                                                                  PROMPT, SPANS)
            values.append(float(metric(r["h"].logits)) - float(metric(r["p"].logits)))
        fd = (values[0] - values[1]) / (2 * eps)
        assert att.heads[unit][h] == pytest.approx(fd, abs=3e-4 * np.abs(att.heads[unit]).max())


def test_integrated_scores_add_up_to_the_end_of_the_path():
    """With every unit a candidate, the path ends at F: Σ integrated ≈ m(F) − m(P) (midpoint
    rule); with only the last token's MLP, it ends at that graft. (float32: eager attention in
    float64 turns padded rows into NaN in transformers.)"""
    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    metric = target_logprob([5, 7])
    att = g.attribute(metric, PROMPTS, SPANS2, steps=8)
    f_value = float(metric(g.run(GraftSpec.load("recipes/specs/f.json"), PROMPTS, SPANS2).logits))
    assert att.metric_end == pytest.approx(f_value, abs=1e-4)
    assert att.metric_p == pytest.approx(float(metric(g.run(GraftSpec(name="p"), PROMPTS, SPANS2).logits)), abs=1e-5)
    gap = att.metric_end - att.metric_p
    assert abs(gap) > 0.1
    assert att.integrated.sum() == pytest.approx(gap, rel=0.02)
    assert abs(att.scores.sum() - gap) > abs(att.integrated.sum() - gap)  # first order alone is worse
    part = g.attribute(metric, PROMPTS, SPANS2, components=["mlp"], groups=["last"], steps=8)
    assert {(u[0], u[1]) for u in part.units} == {("last", c) for c in ("gate", "up", "down")}
    lt_mlp = GraftSpec(name="lt", rules=[GraftRule(components=["mlp"], positions=[Last()])])
    end = float(metric(g.run(lt_mlp, PROMPTS, SPANS2).logits))
    assert part.metric_end == pytest.approx(end, abs=1e-4)
    assert part.integrated.sum() == pytest.approx(end - part.metric_p, rel=0.02, abs=1e-4)


def test_metrics_and_exact_effects():
    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    logits = torch.randn(2, 10)
    lp = torch.log_softmax(logits, -1)
    assert float(target_logprob([1, 2])(logits)) == pytest.approx(float((lp[0, 1] + lp[1, 2]) / 2))
    assert float(target_prob([1, 2], weights=[1.0, 0.0])(logits)) == pytest.approx(float(lp[0, 1].exp()))
    assert float(logit_diff([1, 2], [3, 3])(logits)) == pytest.approx(
        float((logits[0, 1] - logits[0, 3] + logits[1, 2] - logits[1, 3]) / 2))
    rec = recovery_metric([1, 2], 0.1, 0.5)
    assert float(rec(logits)) == pytest.approx((float(target_prob([1, 2])(logits)) - 0.1) / 0.4)
    with pytest.raises(ArgumentError, match="2 target ids for 3 prompts"):
        target_logprob([1, 2])(torch.randn(3, 10))
    with pytest.raises(ArgumentError, match="recovery is undefined"):
        recovery_metric([1], 0.2, 0.2)
    # exact effects are real grafts: the effect of ("last", "up", 1) is the run of its spec
    metric = target_logprob([5, 7])
    unit = ("last", "up", 1)
    effect = exact_effects(g, metric, PROMPTS, SPANS2, [unit])[0]
    grafted = g.run(unit_spec(unit, ["actor"]), PROMPTS, SPANS2).logits
    plain = g.run(GraftSpec(name="p"), PROMPTS, SPANS2).logits
    assert effect == pytest.approx(float(metric(grafted)) - float(metric(plain)), abs=1e-5)


def test_ranked_grid_table_and_round_trip():
    P, F, tok = tiny_pair("llama")
    att = Grafter(P, F, tok).attribute(target_logprob([5]), PROMPT, SPANS, steps=2)
    ranked = att.ranked()
    assert [att.score(u) for u in ranked] == sorted(att.scores.tolist(), reverse=True)
    grid = att.grid("o")
    assert grid.shape == (2, 3) and grid[1, att.groups.index("last")] == att.score(("last", "o", 1))
    assert [r["unit"] for r in att.table(3)] == [f"{u[0]}·{u[1]}" + ("" if u[2] is None else f"·L{u[2]}")
                                                 for u in ranked[:3]]
    back = Attribution.from_dict(att.to_dict())
    assert back.units == att.units and np.array_equal(back.scores, att.scores)
    assert np.array_equal(back.integrated, att.integrated)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [0, 1, 2]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])


def test_bad_arguments_are_one_clear_error():
    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    with pytest.raises(ArgumentError, match="metric"):
        g.attribute("logprob", PROMPT, SPANS)
    with pytest.raises(ArgumentError, match="steps"):
        g.attribute(target_logprob([5]), PROMPT, SPANS, steps=0)
    with pytest.raises(ArgumentError, match=r"unknown position group\(s\) \['nope'\]"):
        g.attribute(target_logprob([5]), PROMPT, SPANS, groups=["nope"])
    with pytest.raises(Exception, match="does not exist"):
        g.attribute(target_logprob([5]), PROMPT, SPANS, components=["c_fc"])
    remote = Grafter.remote(P, F, tok, execution="local", verbose=False)
    with pytest.raises(ArgumentError, match="attribution needs gradients through P in this process: use the local "
                                            "backend"):
        remote.attribute(target_logprob([5]), PROMPT, SPANS)


# ---------------------------------------------------------------------------------------------
# nngraft attribute, nngraft plot
# ---------------------------------------------------------------------------------------------


def test_cli_attribute_writes_scores_exact_effects_and_the_figure(tmp_path, capsys):
    import json

    from nngraft.cli import main as cli_main
    from nngraft.study.data import make_facts, make_test_examples

    out = tmp_path / "att"
    code = cli_main(["attribute", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "3",
                     "--template", "sentence_1", "--targets", "donor_top1", "--steps", "2", "--exact",
                     "--heads", "--top", "5", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top 5 of 63 units by attribution to logprob" in printed and "Spearman" in printed
    data = json.loads((out / "attribution.json").read_text())
    assert (out / "attribution.png").stat().st_size > 10_000
    assert data["groups"] == ["first_actor", "last", "other"] and len(data["units"]) == 63
    assert data["spearman"]["scores"] == pytest.approx(spearman(data["scores"], data["exact"]))
    # the same scores from the API on the same examples (per-fact means of the log-prob of F's top-1)
    P, F, tok = tiny_pair("llama")
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 3, seed=0), "sentence_1")
    g = Grafter(P, F, tok)
    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    ids = g.run(GraftSpec.load("recipes/specs/f.json"), prompts, spans).logits.argmax(-1).tolist()
    assert data["data"]["target_ids"] == ids
    att = g.attribute(target_logprob(ids), prompts, spans)  # one example per fact: the plain mean
    np.testing.assert_allclose(data["scores"], att.scores, atol=1e-5)
    # nngraft plot redraws the heatmaps from the file
    assert cli_main(["plot", str(out / "attribution.json"), "-o", str(tmp_path / "fig"), "--format", "png"]) == 0
    assert (tmp_path / "fig" / "attribution.png").stat().st_size > 10_000


@pytest.mark.parametrize("metric", ["prob", "recovery", "logit_diff"])
def test_cli_attribute_metrics(tmp_path, metric):
    import json

    from nngraft.cli import main as cli_main

    out = tmp_path / metric
    assert cli_main(["attribute", "--tiny", "gpt2", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--targets", "donor_top1", "--metric", metric, "--no-plot",
                     "--components", "mlp", "-o", str(out)]) == 0
    data = json.loads((out / "attribution.json").read_text())
    assert data["metric"] == metric and {u[1] for u in data["units"]} == {"up", "down"}
    if metric == "recovery":
        assert data["metric_p"] == pytest.approx(0.0, abs=1e-6)  # (m_P − m_P) / (m_F − m_P)


def test_cli_attribute_takes_a_registered_metric(tmp_path, request):
    """--metric of the study's metric registry (a module:function here, reading P's logits): the
    scores are its mean's attribution, the same as Grafter.attribute with Metric.scalar; a metric
    without a gradient (rank) is one clear error."""
    import json

    from nngraft.cli import main as cli_main
    from nngraft.study.data import make_facts, make_test_examples
    from nngraft.study.metric_registry import get_metric, unregister

    request.addfinalizer(lambda: unregister("gain_over_p"))
    out = tmp_path / "kl"
    assert cli_main(["attribute", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--targets", "donor_top1", "--metric",
                     "tests.attribution.test_gradient:gain_over_p",
                     "--components", "o", "--no-plot", "-o", str(out)]) == 0
    data = json.loads((out / "attribution.json").read_text())
    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 2, seed=0), "sentence_1")
    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    p_logits = g.run(GraftSpec(name="p"), prompts, spans).logits
    f_logits = g.run(GraftSpec.load("recipes/specs/f.json"), prompts, spans).logits
    metric = get_metric("tests.attribution.test_gradient:gain_over_p").scalar(data["data"]["target_ids"], p_logits=p_logits, f_logits=f_logits)
    att = g.attribute(metric, prompts, spans, components=["o"])
    assert data["metric"] == "gain_over_p" and data["metric_p"] == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(data["scores"], att.scores, atol=1e-6)
    assert cli_main(["attribute", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--metric", "rank", "-o", str(tmp_path / "x")]) == 2
    assert cli_main(["attribute", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--metric", "nope", "-o", str(tmp_path / "y")]) == 2


def gain_over_p(logits, inputs):
    """A metric for the test above: the target's log-prob minus P's (reads the baselines)."""
    ids = inputs.target_ids[:, None]
    return (torch.log_softmax(logits, -1).gather(1, ids) - torch.log_softmax(inputs.p_logits, -1).gather(1, ids))[:, 0]



def test_cli_attribute_bad_input_is_exit_2(tmp_path, capsys):
    from nngraft.cli import main as cli_main

    code = cli_main(["attribute", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--steps", "0", "-o", str(tmp_path / "x")])
    assert code == 2
    assert "--steps must be ≥ 1; got 0" in capsys.readouterr().err


def test_docs_attribution_runs_as_written(tmp_path, capsys, monkeypatch):
    """docs/attribution.md: its Python block and its commands, as written (tiny models)."""
    import re
    import shlex
    from pathlib import Path

    from nngraft.cli import main as cli_main

    text = (ROOT / "docs" / "attribution.md").read_text()
    python = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(python) == 1 and len(bash) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(python[0], "docs/attribution.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'integrated'" in printed and re.search(r"\n-?[01]\.\d+ \(4,\)\n", printed)  # Spearman; 4 heads
    commands = [shlex.split(c) for c in bash[0].replace("\\\n", " ").strip().splitlines()]
    for argv in commands:
        assert argv[0] == "nngraft"
        assert cli_main(argv[1:]) == 0, argv
    assert (tmp_path / "runs/att-tiny/attribution.svg").is_file()  # nngraft plot: png and svg
    assert (tmp_path / "runs/loc-att/spec.json").is_file()


def test_bench_attribute_runs_and_writes_its_docs_section(tmp_path):
    """benchmarks/bench_attribute.py on a tiny pair: every arm's record, the exact recovery of the
    found sets (re-measured here by grafting), and its section of a benchmarks.md written in place."""
    import json

    from benchmarks import bench_attribute
    from nngraft.study.data import make_facts, make_test_examples
    from nngraft.study.localize import units_to_spec

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    record = bench_attribute.main(["--case", "tiny", "--tiny", "llama", "--n", "3", "--steps", "2", "--metric",
                                   "logprob", "--targets", "donor_top1", "--results", str(tmp_path / "res"),
                                   "--docs", str(docs), "--plot", str(tmp_path / "att.png")])
    assert set(record["arms"]) == {"exhaustive", "attribution", "attribution, not pruned", "integrated (2), not pruned"}
    for arm in record["arms"].values():
        assert arm["seconds"] > 0 and arm["load"] >= 0 and arm["recovery"] >= 0.9
        assert arm["cpu_seconds"] > 0
        assert arm["cpu_ratio"] == pytest.approx(record["arms"]["exhaustive"]["cpu_seconds"] / arm["cpu_seconds"],
                                                 rel=0.01)
        assert arm["recovery_diff"] == pytest.approx(arm["recovery"] - record["arms"]["exhaustive"]["recovery"],
                                                     abs=2e-4)
    assert -1 <= record["ranking"]["spearman_first_order"] <= 1 and record["ranking"]["units"] == 63
    assert json.loads((tmp_path / "res" / "tiny.json").read_text())["arms"].keys() == record["arms"].keys()
    text = docs.read_text()
    assert "kept" in text and "| tiny | attribution |" in text and bench_attribute.BEGIN in text
    assert "CPU ratio" in text
    assert (tmp_path / "att.png").stat().st_size > 10_000
    # the recorded recovery of the attribution arm is the exact recovery of its units
    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 3, seed=0), "sentence_1")
    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    units = [tuple(u) for u in record["arms"]["attribution"]["units"]]
    spec = units_to_spec(units, ["first_actor"], n_layers=2)
    runs = g.run_grid({"p": GraftSpec(name="p"), "f": GraftSpec.load("recipes/specs/f.json"), "g": spec},
                      prompts, spans)
    ids = runs["f"].logits.argmax(-1).tolist()
    m = {k: float(target_logprob(ids)(r.logits)) for k, r in runs.items()}
    assert (m["g"] - m["p"]) / (m["f"] - m["p"]) == pytest.approx(record["arms"]["attribution"]["recovery"], abs=2e-4)
