"""One argument order for every Grafter method: the spec first, then the prompts (then spans).
Grafter.trace's former order (prompts first) works for one release with a DeprecationWarning;
anywhere else, a spec where the prompts belong is an ArgumentError that says they are swapped."""

from __future__ import annotations

import warnings

import pytest
import torch

from nngraft import ArgumentError, GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.testing import tiny_pair

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
SPEC = GraftSpec(name="fe_lt", rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor"), Last()])])


@pytest.fixture(scope="module")
def g() -> Grafter:
    return Grafter(*tiny_pair("llama"))


@pytest.mark.parametrize("method", ["run", "compile", "generate", "plan"])
@pytest.mark.parametrize("swapped_spec", [SPEC, [SPEC, SPEC], SPEC.model_dump()], ids=["spec", "list", "dict"])
def test_swapped_arguments_say_so(g, method, swapped_spec):
    with pytest.raises(ArgumentError, match=rf"Grafter\.{method}: the spec and the prompts are swapped .*"
                                            rf"g\.{method}\(spec, prompts, spans\)"):
        getattr(g, method)(PROMPTS, swapped_spec, SPANS)


def test_run_grid_swapped_says_so(g):
    with pytest.raises(ArgumentError, match=r"Grafter\.run_grid: the spec and the prompts are swapped"):
        g.run_grid(PROMPTS, {"fe_lt": SPEC, "p": GraftSpec(name="p")}, SPANS)


def test_every_method_takes_the_spec_first(g):
    run = g.run(SPEC, PROMPTS, SPANS).logits
    grid = g.run_grid([SPEC], PROMPTS, SPANS)["fe_lt"].logits
    torch.testing.assert_close(grid, run, atol=1e-5, rtol=1e-5)
    assert g.plan(SPEC, PROMPTS, SPANS).batch_size == 2
    assert g.compile(SPEC, PROMPTS, SPANS).plan.batch_size == 2
    assert g.generate(SPEC, PROMPTS, SPANS, max_new_tokens=1).tokens.shape == (2, 1)
    lm = g.model_envoy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new order warns of nothing
        with g.trace(SPEC, PROMPTS, spans=SPANS):
            logits = lm.lm_head.output.save()
    torch.testing.assert_close(logits[:, -1], run, atol=1e-5, rtol=1e-5)


def test_trace_in_the_former_order_warns_and_runs_the_same_graft(g):
    lm = g.model_envoy
    with pytest.warns(DeprecationWarning, match=r"Grafter\.trace\(prompts, spec, \.\.\.\) is deprecated .* "
                                                r"takes the spec first: trace\(spec, prompts, spans=\.\.\.\)") as caught:
        with g.trace(PROMPTS, SPEC, spans=SPANS):
            old = lm.lm_head.output.save()
    assert {w.filename for w in caught if w.category is DeprecationWarning} == {__file__}  # the caller's line
    with g.trace(SPEC, PROMPTS, spans=SPANS):
        new = lm.lm_head.output.save()
    torch.testing.assert_close(old, new)


def test_prompts_that_merely_look_odd_are_not_taken_for_a_spec(g):
    """Only a spec (GraftSpec, spec dict, or a list / dict of them) counts as swapped; plain text
    in the spec's place keeps its own error (a spec file that does not exist)."""
    from nngraft.errors import SpecError

    with pytest.raises((SpecError, OSError)):
        g.run("no-such-spec.json", PROMPTS, SPANS)
