"""nngraft.grafter: the one user-facing class — backends, run / run_grid / run_rows, the decode
loop (greedy and forced), and the deprecated RemoteGrafter alias.

One argument order for every Grafter method: the spec first, then the prompts (then spans).
Grafter.trace's former order (prompts first) works for one release with a DeprecationWarning;
anywhere else, a spec where the prompts belong is an ArgumentError that says they are swapped."""

from __future__ import annotations

import warnings
from functools import lru_cache

import pytest
import torch

from nngraft import ArgumentError, GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.arch import adapter_for
from nngraft.backends.base import Backend
from nngraft.backends.local import LocalBackend
from nngraft.backends.ndif import NdifBackend
from nngraft.errors import RemoteUnsupportedError
from nngraft.grafter import RemoteGrafter, per_row
from nngraft.testing import tiny_pair
from tests.helpers.reference import component_swaps, per_token_reference

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
SPEC = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")]),
                                      GraftRule(components=["mlp"], positions=[Last()])])
ATOL, RTOL = 2e-5, 1e-4


@lru_cache(maxsize=None)
def pair(model_type: str = "llama"):
    return tiny_pair(model_type)


def test_default_backend_is_local_and_explicit_equals_default():
    P, F, tok = pair()
    g = Grafter(P, F, tok)
    assert isinstance(g.backend, LocalBackend) and g.backend.supports_cache and g.share_prefix
    assert g.model is P and g.tokenizer is tok and g.batch_size == LocalBackend.default_batch_size
    assert repr(g) == "Grafter('llama', donor='ModelDonor', backend=LocalBackend)"
    explicit = Grafter(P, F, tok, backend=LocalBackend())
    torch.testing.assert_close(explicit.run(SPEC, PROMPTS, SPANS).logits, g.run(SPEC, PROMPTS, SPANS).logits)


def test_remote_is_a_grafter_with_the_ndif_backend_and_gives_the_local_numbers():
    P, F, tok = pair("gpt2")
    g = Grafter.remote(P, F, tok, execution="local", verbose=False)
    assert type(g) is Grafter and isinstance(g.backend, NdifBackend)
    assert g.share_prefix is False and g.batch_size == NdifBackend.default_batch_size == 64
    assert "NdifBackend(execution='local')" in repr(g)
    local = Grafter(P, F, tok).run(SPEC, PROMPTS, SPANS).logits
    torch.testing.assert_close(g.run(SPEC, PROMPTS, SPANS).logits, local, atol=ATOL, rtol=RTOL)
    assert [r.get("purpose") for r in g.backend.requests] == ["identity check"] * 2 + [None]
    with pytest.raises(RemoteUnsupportedError, match="generation is not supported remotely"):
        g.generate(SPEC, PROMPTS, SPANS)


def test_remote_grafter_is_a_deprecated_alias_that_initialises_fully():
    P, F, tok = pair("gpt2")
    with pytest.warns(DeprecationWarning, match=r"use Grafter\.remote"):
        g = RemoteGrafter(P, F, tok, execution="local", verbose=False, batch_size=3)
    assert isinstance(g, Grafter) and isinstance(g.backend, NdifBackend) and g.batch_size == 3
    assert g.call_cost >= 1  # set by Grafter.__init__ (the old class skipped it)
    torch.testing.assert_close(g.run(SPEC, PROMPTS, SPANS).logits, Grafter(P, F, tok).run(SPEC, PROMPTS, SPANS).logits,
                               atol=ATOL, rtol=RTOL)


class CountingBackend(LocalBackend):
    """A backend executes a plan on the Grafter's set-up (``__call__``): this one counts passes and rows."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, bool]] = []

    def __call__(self, setup, plan, batch, **kwargs):
        self.passes.append((batch.input_ids.shape[0], plan.is_empty))
        return super().__call__(setup, plan, batch, **kwargs)


def test_a_custom_backend_runs_every_pass():
    P, F, tok = pair()
    backend = CountingBackend()
    g = Grafter(P, F, tok, backend=backend, batch_size=2, share_prefix=False, check_identities=False)
    out = g.run([GraftSpec(), SPEC, SPEC], PROMPTS + ["Marie Curie stars in"], SPANS + [{"first_actor": "Marie Curie"}])
    assert sorted(n for n, _ in backend.passes) == [1, 2]
    torch.testing.assert_close(out.logits[:2], Grafter(P, F, tok).run([GraftSpec(), SPEC], PROMPTS, SPANS).logits)


def test_a_backend_without_a_cache_never_shares_a_prefix():
    class NoCache(CountingBackend):
        supports_cache = False

    P, F, tok = pair()
    g = Grafter(P, F, tok, backend=NoCache(), call_cost=0, check_identities=False)
    assert g.share_prefix is False
    g.run_grid([GraftSpec(name="p"), SPEC], PROMPTS, SPANS)
    assert len(g.backend.passes) == 1  # four rows, one plain pass, no prefix pass


def test_backend_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Backend()


def test_per_row_gives_one_spec_per_row_or_refuses():
    assert per_row(SPEC, 3) == [SPEC] * 3
    assert per_row([SPEC, GraftSpec()], 2)[1] == GraftSpec()
    with pytest.raises(ValueError, match="got 1 specs for 2 prompts; give one spec, or one per prompt"):
        per_row([SPEC], 2)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_forced_decoding_equals_the_per_token_reference_on_the_forced_sequence(model_type):
    """Teacher forcing: feeding given tokens gives, at each step, the logits the per-token method
    computes on prompt + forced tokens (the last-token graft applies to every new token)."""
    P, F, tok = pair(model_type)
    g = Grafter(P, F, tok)
    adapter = adapter_for(P)
    spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
    mlp = [s for c in adapter.expand(["mlp"])[0] for layer in range(g.n_layers)
           for s in component_swaps(P, adapter, c, layer)]
    [prompt] = g.tokenize([PROMPTS[0]])
    forced = [11, 42, 7]
    L = len(prompt)
    expected, _ = per_token_reference(P, F, list(prompt.ids) + forced, lambda t: mlp if t >= L - 1 else [])
    out = g.generate(spec, [PROMPTS[0]], forced=[forced])
    assert out.tokens[0].tolist() == forced and len(out.step_logits) == 3
    for j, logits in enumerate(out.step_logits):
        torch.testing.assert_close(logits[0], expected[L - 1 + j], atol=ATOL, rtol=RTOL)
    # rows with fewer forced tokens are padded; greedy decoding is the same loop
    both = g.decode([spec, spec], g.tokenize(PROMPTS), 3, forced=[forced, [5]])
    assert both.tokens[1].tolist() == [5, g.pad_id, g.pad_id]
    greedy = g.generate(spec, [PROMPTS[0]], max_new_tokens=3)
    assert greedy.tokens[0].tolist() == [int(s[0].argmax()) for s in greedy.step_logits]
    with pytest.raises(ValueError, match="got 1 forced continuations for 2 prompts"):
        g.decode([spec, spec], g.tokenize(PROMPTS), 2, forced=[forced])


def test_run_grid_equals_separate_runs_and_reports_progress():
    """Many specs packed as rows of shared forward passes give each spec's own numbers."""
    g = Grafter(*pair("llama"))
    prompts = [PROMPTS[0], "Marie Curie stars in", "Q: Who stars in a movie with Grace Hopper? A: An actor named"]
    spans = [SPANS[0], {"first_actor": "Marie Curie"}, {"first_actor": "Grace Hopper"}]
    specs = [GraftSpec(name="p"),
             GraftSpec(name="fe", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")])]),
             GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])])]
    seen = []
    grid = g.run_grid(specs, prompts, spans, batch_size=4, progress=seen.append)
    assert list(grid) == ["p", "fe", "lt_mlp"] and sum(seen) == 9
    for spec in specs:
        alone = g.run(spec, prompts, spans)
        torch.testing.assert_close(grid[spec.name].logits, alone.logits)
    with pytest.raises(ValueError, match="unique"):
        g.run_grid([specs[0], specs[0]], prompts, spans)
    grid = g.run_grid(specs, prompts, spans, progress=True)  # the rich bar path
    torch.testing.assert_close(grid["fe"].logits, g.run(specs[1], prompts, spans).logits)


ORDER_SPEC = GraftSpec(name="fe_lt", rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor"), Last()])])


@pytest.fixture(scope="module")
def g() -> Grafter:
    return Grafter(*tiny_pair("llama"))


@pytest.mark.parametrize("method", ["run", "compile", "generate", "plan"])
@pytest.mark.parametrize("swapped_spec", [ORDER_SPEC, [ORDER_SPEC, ORDER_SPEC], ORDER_SPEC.model_dump()], ids=["spec", "list", "dict"])
def test_swapped_arguments_say_so(g, method, swapped_spec):
    with pytest.raises(ArgumentError, match=rf"Grafter\.{method}: the spec and the prompts are swapped .*"
                                            rf"g\.{method}\(spec, prompts, spans\)"):
        getattr(g, method)(PROMPTS, swapped_spec, SPANS)


def test_run_grid_swapped_says_so(g):
    with pytest.raises(ArgumentError, match=r"Grafter\.run_grid: the spec and the prompts are swapped"):
        g.run_grid(PROMPTS, {"fe_lt": ORDER_SPEC, "p": GraftSpec(name="p")}, SPANS)


def test_every_method_takes_the_spec_first(g):
    run = g.run(ORDER_SPEC, PROMPTS, SPANS).logits
    grid = g.run_grid([ORDER_SPEC], PROMPTS, SPANS)["fe_lt"].logits
    torch.testing.assert_close(grid, run, atol=1e-5, rtol=1e-5)
    assert g.plan(ORDER_SPEC, PROMPTS, SPANS).batch_size == 2
    assert g.compile(ORDER_SPEC, PROMPTS, SPANS).plan.batch_size == 2
    assert g.generate(ORDER_SPEC, PROMPTS, SPANS, max_new_tokens=1).tokens.shape == (2, 1)
    lm = g.model_envoy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new order warns of nothing
        with g.trace(ORDER_SPEC, PROMPTS, spans=SPANS):
            logits = lm.lm_head.output.save()
    torch.testing.assert_close(logits[:, -1], run, atol=1e-5, rtol=1e-5)


def test_trace_in_the_former_order_warns_and_runs_the_same_graft(g):
    lm = g.model_envoy
    with pytest.warns(DeprecationWarning, match=r"Grafter\.trace\(prompts, spec, \.\.\.\) is deprecated .* "
                                                r"takes the spec first: trace\(spec, prompts, spans=\.\.\.\)") as caught:
        with g.trace(PROMPTS, ORDER_SPEC, spans=SPANS):
            old = lm.lm_head.output.save()
    assert {w.filename for w in caught if w.category is DeprecationWarning} == {__file__}  # the caller's line
    with g.trace(ORDER_SPEC, PROMPTS, spans=SPANS):
        new = lm.lm_head.output.save()
    torch.testing.assert_close(old, new)


def test_prompts_that_merely_look_odd_are_not_taken_for_a_spec(g):
    """Only a spec (GraftSpec, spec dict, or a list / dict of them) counts as swapped; plain text
    in the spec's place keeps its own error (a spec file that does not exist)."""
    from nngraft.errors import SpecError

    with pytest.raises((SpecError, OSError)):
        g.run("no-such-spec.json", PROMPTS, SPANS)
