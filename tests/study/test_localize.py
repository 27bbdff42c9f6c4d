"""Automatic localization (nngraft.study.localize) on tiny models where the answer is planted.

F differs from P only in known weights; the search must return exactly those. Every number the
search reports is recomputed here independently: P and F by plain forwards of the two models,
grafted sets with ``Grafter.run``, recovery by hand.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from nngraft import Grafter, GraftSpec
from nngraft.cli import main as cli_main
from nngraft.compile.plan import compile_plan, select_positions
from nngraft.study.data import make_facts, make_test_examples
from nngraft.study.examples import TestExample
from nngraft.study.localize import localize, split_facts
from nngraft.study.localize_units import LocalizeError, group_selectors, unit_label, units_to_spec
from nngraft.testing import perturbed_copy, tiny_model, tiny_pair, tiny_tokenizer

from tests.helpers.recipe_loader import load_recipe

TARGET = 0.9


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On tiny models torch's intra-op threads only spin-wait: with 2 threads on this 2-core box
    a search ran 10× slower (50× when the box was loaded) than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def sharpened(model_type: str, n_layers: int, tok) -> torch.nn.Module:
    """A tiny random model whose next-token distributions are peaked (final norm × 8), so that
    target probabilities are far from uniform and F − P gaps are large."""
    P = tiny_model(model_type, n_layers=n_layers, vocab_size=len(tok))
    with torch.no_grad():
        P.model.norm.weight.mul_(8)
    return P


def direct_last_logits(model, tok, examples) -> torch.Tensor:
    """Next-token logits of each prompt alone: a plain forward, no nngraft in the path."""
    out = []
    for ex in examples:
        ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, -1].float())
    return torch.stack(out)


def per_fact_mean(values, examples) -> np.ndarray:
    """Mean per fact (facts sorted by id), the aggregation the study uses."""
    facts = sorted({e.fact_id for e in examples})
    return np.array([np.mean([v for v, e in zip(values, examples) if e.fact_id == f]) for f in facts])


def target_prob(logits: torch.Tensor, ids) -> list[float]:
    probs = torch.softmax(logits.float(), -1)
    return [float(probs[i, t]) for i, t in enumerate(ids)]


class Reference:
    """Recovery of mean target probability (donor_top1 targets), computed independently."""

    def __init__(self, grafter, P, F, tok, examples):
        self.g, self.examples = grafter, examples
        f_logits = direct_last_logits(F, tok, examples)
        self.ids = f_logits.argmax(-1).tolist()
        self.p = per_fact_mean(target_prob(direct_last_logits(P, tok, examples), self.ids), examples).mean()
        self.f = per_fact_mean(target_prob(f_logits, self.ids), examples).mean()

    def recovery(self, spec: GraftSpec) -> float:
        out = self.g.run(spec, [e.prompt for e in self.examples], [e.spans for e in self.examples])
        g = per_fact_mean(target_prob(out.logits, self.ids), self.examples).mean()
        return float((g - self.p) / (self.f - self.p))


def spec_of(units, result) -> GraftSpec:
    return units_to_spec(units, result.settings["spans"], n_layers=result.settings["n_layers"], name="x")


def count_forwards(grafter) -> list[int]:
    calls = [0]
    inner = grafter.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    grafter.forward = counted
    return calls


# ---------------------------------------------------------------------------------------------
# Planted: F = P except layer-1 MLP up_proj and the last layer's attention o_proj
# ---------------------------------------------------------------------------------------------

PLANTED = ("model.layers.1.mlp.up_proj", "model.layers.2.self_attn.o_proj")


@pytest.fixture(scope="module")
def module_plant():
    tok = tiny_tokenizer("llama")
    P = sharpened("qwen2", 3, tok)
    F = perturbed_copy(P, scale=0.3, only=PLANTED)
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 4, seed=0), "sentence_1")
    g = Grafter(P, F, tok, batch_size=24, check_identities=False)  # every forward is counted
    forwards = count_forwards(g)
    result = localize(g, examples, targets="donor_top1", console=quiet(), show_progress=False)
    return g, Reference(g, P, F, tok, examples), result, forwards[0]


def test_both_planted_modules_are_needed_by_construction(module_plant):
    """Ground truth without the search: each planted module alone (at every token) falls short."""
    g, ref, result, _ = module_plant
    from nngraft import All, GraftRule

    up = GraftSpec(name="up1", rules=[GraftRule(components=["up"], layers=[1], positions=[All()])])
    o = GraftSpec(name="o2", rules=[GraftRule(components=["o"], layers=[2], positions=[All()])])
    both = GraftSpec(name="both", rules=[*up.rules, *o.rules])
    assert ref.recovery(up) < TARGET and ref.recovery(o) < TARGET
    assert ref.recovery(both) == pytest.approx(1.0, abs=1e-5)  # the planted modules are all of F's change


def test_search_returns_exactly_the_planted_modules(module_plant):
    _, _, result, _ = module_plant
    assert {(c, layer) for _, c, layer in result.units} == {("up", 1), ("o", 2)}
    # the last layer's o_proj can only matter at the last token: grafting it elsewhere changes nothing
    assert {group for group, c, _ in result.units if c == "o"} == {"last"}
    assert result.reached and result.settings["targets"] == "donor_top1"


def test_found_spec_reaches_the_target_and_is_one_minimal(module_plant):
    _, ref, result, _ = module_plant
    assert ref.recovery(result.spec) == pytest.approx(result.recovery.mean, abs=1e-5)
    assert result.recovery.mean >= TARGET
    for unit in result.units:
        rest = [u for u in result.units if u != unit]
        assert ref.recovery(spec_of(rest, result)) < TARGET, f"{unit_label(unit)} is not needed"


def test_reported_baselines_and_targets_match_plain_forwards(module_plant):
    _, ref, result, _ = module_plant
    assert result.data["target_ids"] == ref.ids
    assert result.baselines["p"] == pytest.approx(ref.p, abs=1e-5)
    assert result.baselines["f"] == pytest.approx(ref.f, abs=1e-5)
    assert result.baselines["universe_recovery"] == pytest.approx(1.0, abs=1e-4)


def test_forward_passes_and_rows_are_counted(module_plant):
    _, _, result, forwards = module_plant
    assert result.forward_passes == forwards  # every forward of P the search made
    assert sum(s.forward_passes for s in result.steps) == forwards
    n = result.data["n_examples"]
    assert result.rows == sum(s.rows for s in result.steps) == n * result.candidates_evaluated
    # one batched run per step: rows / 24 rounded up per step
    assert all(s.forward_passes == -(-s.rows // 24) for s in result.steps if s.kind != "baselines")
    assert result.grid_calls == sum(1 for s in result.steps if s.forward_passes)


def test_steps_are_coarse_to_fine(module_plant):
    _, _, result, _ = module_plant
    stages = [s.stage for s in result.steps]
    assert stages[:2] == ["baselines", "positions"]
    order = ["baselines", "positions", "families", "components", "layers 1", "layers 2", "prune", "curve"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    assert stages[-1] == "curve" and "layers 2" in stages  # 3 layers: [0] | [1, 2] → [1] | [2]
    for step in result.steps[1:-1]:  # the kept set always reaches the target
        assert step.recovery >= TARGET


def test_recovery_curve(module_plant):
    _, ref, result, _ = module_plant
    curve = result.curve
    assert [c.n_units for c in curve] == list(range(len(result.units) + 1))
    assert curve[0].recovery == 0.0 and curve[-1].recovery == pytest.approx(result.recovery.mean, abs=1e-9)
    added = [c.added for c in curve[1:]]
    assert sorted(added) == sorted(unit_label(u) for u in result.units)
    by_label = {unit_label(u): u for u in result.units}
    first_two = [by_label[a] for a in added[:2]]
    assert curve[2].recovery == pytest.approx(ref.recovery(spec_of(first_two, result)), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Planted by position: F's embeddings differ only for tokens that occur only in the entity
# span, and the last layer's o_proj (which matters only at the last token)
# ---------------------------------------------------------------------------------------------


def _position_plant():
    tok = tiny_tokenizer("llama")
    P = sharpened("qwen2", 2, tok)
    F = perturbed_copy(P, scale=0.3, only=("model.layers.1.self_attn.o_proj",))
    facts = make_facts("fake_movies_fake_actors", 6, seed=0)
    examples = make_test_examples(facts, "sentence_1") + make_test_examples(facts, "sentence_2")
    g = Grafter(P, F, tok, batch_size=64)
    inside, outside = set(), set()
    for t in g.tokenize([e.prompt for e in examples], [e.spans for e in examples]):
        span = set(t.spans["first_actor"])
        for i, token in enumerate(t.ids):
            (inside if i in span else outside).add(token)
    rows = sorted(inside - outside)
    assert len(rows) > 10
    with torch.no_grad():
        F.model.embed_tokens.weight[rows] += torch.randn(len(rows), 32, generator=torch.Generator().manual_seed(5))
    return g, P, F, tok, examples


def _search(g, examples, **kw):
    return localize(g, examples, targets="donor_top1", holdout=0.5, seed=3, console=quiet(),
                    show_progress=False, **kw)


@pytest.fixture(scope="module")
def position_plant():
    g, P, F, tok, examples = _position_plant()
    return g, P, F, tok, examples, _search(g, examples)


def test_position_plant_finds_the_entity_embeddings_and_the_last_token_o(position_plant):
    *_, result = position_plant
    assert result.units == [("first_actor", "embed", None), ("last", "o", 1)]
    rules = [r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in result.spec.rules]
    assert rules == [{"components": ["embed"], "layers": "all", "positions": [{"span": "first_actor"}]},
                     {"components": ["o"], "layers": [1], "positions": [{"last": True}]}]


def test_heldout_split_and_recovery(position_plant):
    g, P, F, tok, examples, result = position_plant
    search, held = result.data["search_facts"], result.data["heldout_facts"]
    assert len(search) == len(held) == 3 and not set(search) & set(held)
    assert sorted(search + held) == sorted({e.fact_id for e in examples})
    held_examples = [e for e in examples if e.fact_id in held]
    ref = Reference(g, P, F, tok, held_examples)
    assert result.heldout_recovery.n == 3
    assert result.heldout_recovery.mean == pytest.approx(ref.recovery(result.spec), abs=1e-5)
    assert result.curve[-1].heldout_recovery == pytest.approx(result.heldout_recovery.mean, abs=1e-9)
    assert result.baselines["heldout"]["p"] == pytest.approx(ref.p, abs=1e-5)
    # the search itself only saw the search facts (two templates each: a fact counts once)
    search_examples = [e for e in examples if e.fact_id in search]
    ref = Reference(g, P, F, tok, search_examples)
    assert result.baselines["n_facts"] == 3
    assert result.baselines["p"] == pytest.approx(ref.p, abs=1e-5)
    assert result.recovery.mean == pytest.approx(ref.recovery(result.spec), abs=1e-5)


def test_deterministic_for_a_seed(position_plant):
    g, *_, examples, result = position_plant
    again = _search(g, examples)
    first, second = result.to_dict(), again.to_dict()
    first.pop("timing"), second.pop("timing")
    assert first == second
    assert split_facts([e.fact_id for e in examples], 0.5, seed=4) != split_facts(
        [e.fact_id for e in examples], 0.5, seed=3)


def test_saved_files(position_plant, tmp_path):
    *_, result = position_plant
    paths = result.save(tmp_path / "out")
    assert GraftSpec.load(paths["spec"]) == result.spec
    data = json.loads(paths["result"].read_text())
    assert data["spec_file"] == "spec.json" and data["spec_hash"] == result.spec.content_hash()
    assert data["forward_passes"] == result.forward_passes and data["n_units"] == 2
    assert data["units"] == [["first_actor", "embed", None], ["last", "o", 1]]
    assert [s["stage"] for s in data["steps"]] == [s.stage for s in result.steps]
    assert data["recovery"]["mean"] == pytest.approx(result.recovery.mean)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from nngraft.study.localize_plot import plot_localize

    assert plot_localize(data, tmp_path / "again.png").stat().st_size > 10_000  # re-plot from the JSON


# ---------------------------------------------------------------------------------------------
# Planted in the LM head, scored on the answers (the default targets and metric)
# ---------------------------------------------------------------------------------------------


def test_answer_targets_planted_in_the_lm_head():
    """F = P except LM-head rows that push each prompt's answer token up; with the default
    targets (first answer token) and metric (probability) the search must return exactly F's LM
    head at the last token."""
    tok = tiny_tokenizer("llama")
    P = sharpened("qwen2", 2, tok)
    F = perturbed_copy(P, scale=0.0)
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 4, seed=1), "sentence_1")
    answer_ids = []
    for ex in examples:  # the first token after the prompt's own, by hand
        head = tok(ex.prompt)["input_ids"]
        full = tok(ex.prompt + " " + ex.answer)["input_ids"]
        assert full[:len(head)] == head
        answer_ids.append(full[len(head)])
        with torch.no_grad():
            h = P(input_ids=torch.tensor([head]), output_hidden_states=True).hidden_states[-1][0, -1]
            F.lm_head.weight[answer_ids[-1]] += 0.5 * h
    g = Grafter(P, F, tok)
    result = localize(g, examples, console=quiet(), show_progress=False)
    assert result.units == [("last", "lm_head", None)]
    assert result.settings["targets"] == "answer" and result.settings["metric"] == "prob"
    assert result.data["target_ids"] == answer_ids
    p = per_fact_mean(target_prob(direct_last_logits(P, tok, examples), answer_ids), examples).mean()
    f = per_fact_mean(target_prob(direct_last_logits(F, tok, examples), answer_ids), examples).mean()
    assert f - p > 0.5
    assert result.baselines["p"] == pytest.approx(p, abs=1e-5) and result.baselines["f"] == pytest.approx(f, abs=1e-5)
    assert result.recovery.mean == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Specs from units
# ---------------------------------------------------------------------------------------------


def test_units_to_spec_grafts_exactly_the_units():
    P, F, tok = tiny_pair("llama", n_layers=3)
    g = Grafter(P, F, tok)
    [prompt] = g.tokenize(["Ada Lovelace stars in The Engine alongside"],
                          [{"first_actor": "Ada Lovelace", "movie_title": "The Engine"}])
    spans = ["first_actor", "movie_title"]
    units = [("first_actor", "embed", None), ("first_actor", "up", 0), ("first_actor", "up", 2),
             ("movie_title", "up", 0), ("movie_title", "up", 2), ("last", "o", 1), ("last", "lm_head", None),
             ("other", "q", 1), ("last", "gate", 1), ("last", "up", 1), ("last", "down", 1)]
    for c in ("gate", "up", "down"):
        units += [(group, c, 2) for group in ("first_actor", "movie_title", "last", "other")]
    spec = units_to_spec(units, spans, n_layers=3, groups={"mlp": ("gate", "up", "down")})
    plan = compile_plan([spec], g.adapter, P.config, [prompt], collapse_mlp=False)
    got = {(m.components, m.layer, int(c)) for m in plan.modules for c in m.cols}
    selectors = group_selectors(spans)
    expected = {((c,), layer, p) for group, c, layer in set(units)
                for p in select_positions(selectors[group], prompt)}
    assert got == expected
    # an MLP at every position group is written as one rule at every token
    every = [(group, c, 2) for group in ("first_actor", "movie_title", "last", "other") for c in ("gate", "up", "down")]
    [rule] = units_to_spec(every, spans, n_layers=3, groups={"mlp": ("gate", "up", "down")}).rules
    assert rule.model_dump(mode="json", by_alias=True, exclude_none=True) == {
        "components": ["mlp"], "layers": [2], "positions": [{"all": True}]}


def test_split_facts():
    facts = [f"f{i}" for i in range(10)]
    search, held = split_facts(facts, 0.2, seed=0)
    assert len(held) == 2 and sorted(search + held) == facts
    assert split_facts(list(reversed(facts)), 0.2, seed=0) == (search, held)
    assert split_facts(facts, 0.0, seed=0) == (facts, [])
    assert split_facts(["a", "b"], 0.99, seed=0)[0]  # at least one fact is searched


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


EX = [TestExample(f"f{i}", "t", f"{a} stars in a movie alongside", {"first_actor": a}, "Alan")
      for i, a in enumerate(["Ada Lovelace", "Grace Hopper"])]


@pytest.fixture(scope="module")
def tiny():
    P, F, tok = tiny_pair("qwen2")
    return Grafter(P, F, tok)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0.0}, "target must be a recovery in (0, 1]"),
    ({"target": 1.5}, "target must be a recovery in (0, 1]"),
    ({"metric": "nope"}, "unknown metric 'nope'; known: prob, logprob, rank"),
    ({"metric": "kl_f_graft"}, "metric 'kl_f_graft' cannot steer a search"),
    ({"targets": "donor"}, "unknown targets 'donor'"),
    ({"holdout": 1.0}, "holdout is a fraction of the facts in [0, 1)"),
    ({"spans": ["movie_title"]}, "example 'f0/t' has no span ['movie_title']"),
    ({"spans": ["last"]}, "a span may not be called 'last'"),
    ({"targets": [1, 2, 3]}, "3 target ids for 2 examples"),
])
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(LocalizeError) as error:
        localize(tiny, EX, console=quiet(), show_progress=False, **kwargs)
    assert message in str(error.value)


def test_bad_examples(tiny):
    with pytest.raises(LocalizeError, match="no test examples"):
        localize(tiny, [], console=quiet())
    with pytest.raises(LocalizeError, match="example 'f0/t' .* occurs twice"):
        localize(tiny, [EX[0], EX[0]], console=quiet())
    with pytest.raises(LocalizeError, match="a held-out split needs at least 2 facts; got 1"):
        localize(tiny, EX[:1], holdout=0.5, console=quiet())


def test_f_equal_to_p_is_an_error_naming_both_baselines():
    P, _, tok = tiny_pair("qwen2")
    g = Grafter(P, perturbed_copy(P, scale=0.0), tok)
    with pytest.raises(LocalizeError) as error:
        localize(g, EX, metric="top1", targets="donor_top1", console=quiet(), show_progress=False)
    # F's own top-1 is P's top-1: both are 100 % accurate, the gap is 0
    assert "F ≈ P on top-1 accuracy: P = 1.0000, F = 1.0000 (|F − P| = 0.0000 < min_gap 0.05)" in str(error.value)


def test_without_globals_an_lm_head_change_cannot_be_reached():
    tok = tiny_tokenizer("llama")
    P = sharpened("qwen2", 2, tok)
    F = perturbed_copy(P, scale=1.0, only=("lm_head",))
    g = Grafter(P, F, tok)
    with pytest.raises(LocalizeError) as error:
        localize(g, EX, targets="donor_top1", include_globals=False, console=quiet(), show_progress=False)
    assert "grafting every unit the search may use recovers only 0.000 < target 0.9" in str(error.value)
    assert "global components are excluded" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_localize_writes_spec_result_and_plot(tmp_path, capsys):
    out = tmp_path / "loc"
    code = cli_main(["localize", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--targets", "donor_top1", "--metric", "logprob",
                     "--target", "0.8", "--no-progress", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert f"spec: {out / 'spec.json'}" in printed.out and "forward passes" in printed.out  # the finding: stdout
    assert "nngraft localize" in printed.err  # the search's log: stderr
    data = json.loads((out / "localize.json").read_text())
    spec = GraftSpec.load(out / "spec.json")
    assert spec.recipient.name.startswith("nngraft.testing.tiny_pair('llama'")
    assert data["settings"]["metric"] == "logprob" and data["settings"]["target"] == 0.8
    assert data["recovery"]["mean"] >= 0.8 and (out / "localize.png").exists()
    # the log-prob baselines, recomputed from plain forwards of the same tiny pair
    P, F, tok = tiny_pair("llama")
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 2, seed=0), "sentence_1")
    f_logits = direct_last_logits(F, tok, examples)
    ids = f_logits.argmax(-1)
    for name, logits in (("p", direct_last_logits(P, tok, examples)), ("f", f_logits)):
        logp = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0].tolist()
        assert data["baselines"][name] == pytest.approx(per_fact_mean(logp, examples).mean(), abs=1e-4)


def test_cli_localize_needs_models(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["localize", "--dataset", "fake_movies_fake_actors", "--n", "2", "--template", "sentence_1"])
    assert exit_.value.code == 2
    assert "give --model and --donor" in capsys.readouterr().err


def _recipe():
    return load_recipe("localize")


def test_recipe_dry_run(tmp_path, capsys):
    assert _recipe().main(["--tiny", "--n", "3", "--dry-run", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    # sentence_3 has two spans: 4 position groups, 14 proper subsets in the first step
    assert "['first_actor', 'movie_title'] + last + other" in err and "14 subsets: 42 rows →" in err
    assert "'targets': 'donor_top1'" in err and "'metric': 'logprob'" in err  # the --tiny defaults
    assert not (tmp_path / "out").exists()


def test_recipe_without_models_is_an_error(capsys):
    assert _recipe().main(["--dry-run"]) == 1
    assert "give --model and --donor" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The attribution screen (docs/attribution.md)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_attribution_screen_finds_the_planted_modules_exactly(module_plant, steps):
    """screen="attribution": units ranked by attribution, verified by exact grafts, pruned: the
    same planted modules, an exact recovery (recomputed by a plain graft), 1-minimal."""
    g, ref, _, _ = module_plant
    result = localize(g, ref.examples, targets="donor_top1", console=quiet(), show_progress=False,
                      screen="attribution", screen_steps=steps)
    assert {(c, layer) for _, c, layer in result.units} == {("up", 1), ("o", 2)}
    assert ref.recovery(result.spec) == pytest.approx(result.recovery.mean, abs=1e-5)
    assert result.recovery.mean >= TARGET
    for unit in result.units:
        rest = [u for u in result.units if u != unit]
        assert ref.recovery(spec_of(rest, result)) < TARGET, f"{unit_label(unit)} is not needed"
    assert result.settings["screen"] == "attribution" and result.settings["screen_steps"] == steps
    assert result.data["screen"]["units_scored"] == result.universe_units
    assert [s.stage for s in result.steps][:2] == ["baselines", "screen"]


def test_attribution_screen_bad_options():
    P, F, tok = tiny_pair("llama")
    ex = [TestExample("f0", "t", "Ada Lovelace stars in", {"first_actor": "Ada Lovelace"}, "Alan")]
    with pytest.raises(LocalizeError, match="unknown screen 'fast'; use one of exhaustive, attribution"):
        localize(Grafter(P, F, tok), ex, screen="fast")
    with pytest.raises(LocalizeError, match="screen_steps must be a whole number ≥ 1; got 0"):
        localize(Grafter(P, F, tok), ex, screen="attribution", screen_steps=0)


def test_cli_localize_screen_attribution(tmp_path, capsys):
    out = tmp_path / "loc"
    code = cli_main(["localize", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--template", "sentence_1", "--targets", "donor_top1", "--metric", "logprob",
                     "--target", "0.8", "--screen", "attribution", "--screen-steps", "2", "--no-prune",
                     "--no-progress", "-o", str(out)])
    assert code == 0
    data = json.loads((out / "localize.json").read_text())
    assert data["settings"]["screen"] == "attribution" and data["recovery"]["mean"] >= 0.8
    assert data["settings"]["screen_steps"] == 2 and data["settings"]["screen_prune"] is False
    assert "attribution screen" in capsys.readouterr().err


def test_attribution_screen_without_pruning_keeps_a_verified_prefix(module_plant):
    """screen_prune=False: the smallest verified prefix of a ranking, its recovery exact (a plain
    graft gives the same), every planted module in it; the curve has a few points, not one per unit."""
    g, ref, _, _ = module_plant
    result = localize(g, ref.examples, targets="donor_top1", console=quiet(), show_progress=False,
                      screen="attribution", screen_prune=False)
    assert {("up", 1), ("o", 2)} <= {(c, layer) for _, c, layer in result.units}
    assert ref.recovery(result.spec) == pytest.approx(result.recovery.mean, abs=1e-5)
    assert result.recovery.mean >= TARGET
    assert "prune" not in {s.stage for s in result.steps} and result.settings["screen_prune"] is False
    assert [p.n_units for p in result.curve][1:] == [k for k in (1, 2, 3, 4, 6, 9, 13, 19, 28, 42)
                                                      if k < len(result.units)] + [len(result.units)]
