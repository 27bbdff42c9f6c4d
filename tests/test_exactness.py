"""One-pass grafting equals the paper's per-token weight swap (tests/helpers/reference.py), on every
supported architecture, for every component, for spans, complements, padded mixed batches and
generation. These tests are the proof the design rests on."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from nngraft import All, GraftRule, GraftSpec, Grafter, Index, Last, Not, Other, Span
from nngraft.arch import adapter_for
from nngraft.testing import TINY_MODEL_TYPES, tiny_pair

from tests.helpers.reference import component_swaps, module_swaps, per_token_reference
from tests.helpers.exactness import (ATOL, PROMPT, RTOL, SPANS, assert_close, one_pass, reference,  # noqa: F401
                                    setup, span_tokens, swaps)


def component_cases():
    for mt in TINY_MODEL_TYPES:
        P, *_ = tiny_pair(mt)
        for c in adapter_for(P).components:
            yield mt, c


@pytest.mark.parametrize("model_type,component", list(component_cases()))
def test_each_component_alone(model_type, component):
    """Graft one component, every layer, at token 1 and at the last token."""
    _, _, _, g, _ = setup(model_type)
    spec = GraftSpec(rules=[GraftRule(components=[component], positions=[Index(index=[1]), Last()])])
    chosen = swaps(model_type, [component])
    expected, _ = reference(model_type, PROMPT, lambda t, L: chosen if t in (1, L - 1) else [])
    actual = one_pass(g, spec)
    assert_close(actual, expected)
    # and the graft really changed something (F differs from P in every weight)
    plain = one_pass(g, GraftSpec())
    assert (actual - plain).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_empty_spec_is_plain_recipient(model_type):
    P, _, tok, g, _ = setup(model_type)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        plain = P(ids).logits[0]
    assert torch.equal(one_pass(g, GraftSpec()), plain)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_everything_everywhere_is_donor(model_type):
    _, F, tok, g, _ = setup(model_type)
    spec = GraftSpec(rules=[GraftRule(components=["everything"], positions=[All()])])
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        donor = F(ids).logits[0]
    assert_close(one_pass(g, spec), donor)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_attention_and_mlp_at_last_token_match_whole_module_swaps(model_type):
    """'attn' and 'mlp' grafts equal swapping the *whole* attention / MLP module's weights —
    which also proves the groups cover every weight of those modules."""
    P, _, _, g, adapter = setup(model_type)
    q_path = adapter.sites("q", 0, P.config)[0].path
    down_path = adapter.sites("down", 0, P.config)[0].path
    for group, module_of in (("attn", q_path), ("mlp", down_path)):
        parent = module_of.rsplit(".", 1)[0]
        whole = [s for layer in range(g.n_layers)
                 for s in module_swaps(P, parent.replace(".0.", f".{layer}.", 1))]
        expected, _ = reference(model_type, PROMPT, lambda t, L: whole if t == L - 1 else [])
        spec = GraftSpec(rules=[GraftRule(components=[group], positions=[Last()])])
        assert_close(one_pass(g, spec), expected)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_entity_span_only_and_fe_lt(model_type):
    _, _, _, g, _ = setup(model_type)
    fe = span_tokens(model_type)
    assert fe, "the span must select tokens"
    every = swaps(model_type, ["all"])
    spec = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")])])
    expected, _ = reference(model_type, PROMPT, lambda t, L: every if t in fe else [])
    assert_close(one_pass(g, spec), expected)

    spec = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])
    expected, _ = reference(model_type, PROMPT, lambda t, L: every if t in fe or t == L - 1 else [])
    assert_close(one_pass(g, spec), expected)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "olmo"])
def test_complements_other_and_not(model_type):
    """(FE+LT)^C written two ways: with {"not": [...]} and with the paper's {"other": true}."""
    _, _, _, g, _ = setup(model_type)
    fe = span_tokens(model_type)
    every = swaps(model_type, ["all"])
    expected, _ = reference(model_type, PROMPT, lambda t, L: [] if t in fe or t == L - 1 else every)
    with_not = GraftSpec(rules=[GraftRule(components=["all"],
                                          positions=[Not(**{"not": [Span(span="first_actor"), Last()]})])])
    assert_close(one_pass(g, with_not), expected)
    # 'other' = every position no other rule names; the MLP-at-FE/LT rule names FE and LT.
    with_other = GraftSpec(rules=[
        GraftRule(components=["all"], positions=[Other()]),
        GraftRule(components=["mlp"], layers="last:1", positions=[Span(span="first_actor"), Last()]),
    ])
    last_mlp = swaps(model_type, ["mlp"], layers=[g.n_layers - 1])
    expected, _ = reference(model_type, PROMPT,
                            lambda t, L: last_mlp if t in fe or t == L - 1 else every)
    assert_close(one_pass(g, with_other), expected)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "olmo"])
def test_layer_subsets(model_type):
    _, _, _, g, _ = setup(model_type)
    chosen = swaps(model_type, ["o", "up", "ln_mlp"] if model_type != "olmo" else ["o", "up"], layers=[1])
    comps = ["o", "up", "ln_mlp"] if model_type != "olmo" else ["o", "up"]
    spec = GraftSpec(rules=[GraftRule(components=comps, layers=[-1], positions=[Index(index=[0, 2]), Last()])])
    expected, _ = reference(model_type, PROMPT, lambda t, L: chosen if t in (0, 2, L - 1) else [])
    assert_close(one_pass(g, spec), expected)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma2", "gemma3_text", "qwen2", "olmo"])
def test_mixed_specs_padded_batch(model_type):
    """Rows of one batch carry different specs and lengths; each equals its own reference."""
    _, _, _, g, _ = setup(model_type)
    prompts = [PROMPT, "Q: Who stars in a movie with Grace Hopper? A: An actor named",
               "Marie Curie stars in", "A new movie stars Tom Hanks and"]
    spans = [SPANS, {"first_actor": "Grace Hopper"}, {"first_actor": "Marie Curie"}, {"first_actor": "Tom Hanks"}]
    specs = [
        GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])]),
        GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], positions=[Last()])]),
        GraftSpec(name="none"),
        GraftSpec(name="lt_qk", rules=[GraftRule(components=["q", "k"], layers="first:1", positions=[Last()])]),
    ]
    out = g.run(specs, prompts, spans, all_logits=True)
    every = swaps(model_type, ["all"])
    mlp = swaps(model_type, ["mlp"])
    qk0 = swaps(model_type, ["q", "k"], layers=[0])
    tables = [
        lambda fe: (lambda t, L: every if t in fe or t == L - 1 else []),
        lambda fe: (lambda t, L: mlp if t == L - 1 else []),
        lambda fe: (lambda t, L: []),
        lambda fe: (lambda t, L: qk0 if t == L - 1 else []),
    ]
    for i, (prompt, span) in enumerate(zip(prompts, spans)):
        fe = span_tokens(model_type, prompt, span)
        expected, _ = reference(model_type, prompt, tables[i](fe))
        assert_close(out.all_logits[i], expected)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "olmo"])
def test_generation_under_graft(model_type):
    """3 new tokens: 'last' grafts each new token; earlier tokens keep their cached K/V."""
    _, _, _, g, _ = setup(model_type)
    fe = span_tokens(model_type)
    every = swaps(model_type, ["all"])
    mlp = swaps(model_type, ["mlp"])
    spec = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")]),
                            GraftRule(components=["mlp"], positions=[Last()])])

    def table(t, L):  # L = prompt length; t ≥ L - 1 are the last prompt token and new tokens
        return every if t in fe else (mlp if t >= L - 1 else [])

    expected, tokens = reference(model_type, PROMPT, table, new_tokens=3)
    result = g.generate(spec, [PROMPT], [SPANS], max_new_tokens=3)
    L = len(g.tokenize([PROMPT])[0])
    assert result.tokens[0].tolist() == tokens
    for step, logits in enumerate(result.step_logits):
        assert_close(logits[0], expected[L - 1 + step])


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox"])
def test_fused_qkv_slices_are_semantically_q_k_v(model_type):
    """Independent of the reference: in a causal model, the query at position 0 only affects
    position 0, and position 0 attends only to itself, so grafting q at token 0 changes nothing
    at all; grafting k at token 0 leaves token 0 unchanged but changes token 1; grafting v at
    token 0 changes token 0."""
    _, _, _, g, _ = setup(model_type)
    prompt = "Ada Lovelace"
    plain = one_pass(g, GraftSpec(), prompt, {})
    at0 = {c: one_pass(g, GraftSpec(rules=[GraftRule(components=[c], positions=[Index(index=[0])])]), prompt, {})
           for c in ("q", "k", "v")}
    assert torch.allclose(at0["q"], plain, atol=1e-6)
    assert torch.allclose(at0["k"][0], plain[0], atol=1e-6)
    assert not torch.allclose(at0["k"][1:], plain[1:], atol=1e-4)
    assert not torch.allclose(at0["v"][0], plain[0], atol=1e-4)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_rules_from_two_donors(model_type):
    """The paper's hybrid set-up: one donor at the entity, another at the last token."""
    from nngraft.testing import perturbed_copy

    P, F, tok, _, adapter = setup(model_type)
    H = perturbed_copy(P, seed=7)
    g = Grafter(P, F, tok, donors={"hybrid": H})
    spec = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")]),
                            GraftRule(components=["mlp", "o"], layers="last:1", positions=[Last()], donor="hybrid")])
    fe = span_tokens(model_type)
    every = swaps(model_type, ["all"])
    late = [(*s, H) for s in swaps(model_type, ["mlp", "o"], layers=[g.n_layers - 1])]
    expected, _ = reference(model_type, PROMPT, lambda t, L: every if t in fe else (late if t == L - 1 else []))
    assert_close(one_pass(g, spec), expected)
    # the same component, layer and token from two donors is ambiguous
    clash = GraftSpec(name="clash", rules=[GraftRule(components=["o"], positions=[Last()]),
                                           GraftRule(components=["o"], positions=[All()], donor="hybrid")])
    from nngraft import SpecError
    with pytest.raises(SpecError, match=r"spec 'clash': component 'o' at layer 0, token \d+ of row 0 is grafted from two donors \('default' and 'hybrid'\)"):
        g.run(clash, [PROMPT], [SPANS])
    from nngraft import DonorMismatchError
    with pytest.raises(DonorMismatchError, match=r"donor 'hybrid', but this run has donors \['default'\]"):
        setup(model_type)[3].run(spec, [PROMPT], [SPANS])
