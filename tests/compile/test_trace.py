"""Grafts inside nnsight traces (nngraft.compile.trace): every activation under a graft — each layer's
hidden states, each attention and MLP output, at every position — equals the per-token weight-swap
reference's (tests/helpers/reference.py), with and without the user's own interventions composed in; and
the same graft applied inside a trace the user opened on their own nnsight wrapper of P."""

from __future__ import annotations

from functools import lru_cache

import nnsight
import pytest
import torch

import nngraft
from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.arch import adapter_for
from nngraft.errors import TraceError
from nngraft.testing import tiny_pair

from tests.helpers.reference import component_swaps, per_token_activations

EXACTNESS_TYPES = ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "olmo"]
PROMPTS = ["Ada Lovelace stars in a movie alongside", "Marie Curie stars in"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Marie Curie"}]
FE_LT = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])
LT_MLP = GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], positions=[Last()])])
ATOL, RTOL = 2e-5, 1e-4


@lru_cache(maxsize=None)
def setup(model_type: str):
    P, F, tok = tiny_pair(model_type)
    return P, F, tok, Grafter(P, F, tok), adapter_for(P)


def module_paths(model_type: str) -> list[str]:
    """Per layer, in forward order: the attention module, the MLP, the block (hidden states)."""
    P, _, _, g, adapter = setup(model_type)
    out = []
    for layer in range(g.n_layers):
        attn = adapter.sites("o", layer, P.config)[0].path.rsplit(".", 1)[0]
        out += [attn, f"{adapter.layers_path}.{layer}.{adapter.mlp_path}", f"{adapter.layers_path}.{layer}"]
    return out


def swaps(model_type: str, components, layers=None):
    P, _, _, g, adapter = setup(model_type)
    block, global_ = adapter.expand(list(components))
    out = [s for c in global_ for s in component_swaps(P, adapter, c, None)]
    for c in block:
        for layer in (range(g.n_layers) if layers is None else layers):
            out += component_swaps(P, adapter, c, layer)
    return out


def table_for(spec: GraftSpec, model_type: str, prompt_index: int):
    """The reference's swaps per token for FE_LT / LT_MLP / no graft on PROMPTS[prompt_index]."""
    _, _, _, g, _ = setup(model_type)
    fe = set(g.tokenize([PROMPTS[prompt_index]], [SPANS[prompt_index]])[0].spans["first_actor"])
    every, mlp = swaps(model_type, ["all"]), swaps(model_type, ["mlp"])
    if spec is FE_LT:
        return lambda t, L: every if t in fe or t == L - 1 else []
    if spec is LT_MLP:
        return lambda t, L: mlp if t == L - 1 else []
    return lambda t, L: []


def reference(model_type: str, prompt_index: int, spec: GraftSpec, record=(), edits=None):
    P, F, tok, _, _ = setup(model_type)
    ids = tok(PROMPTS[prompt_index])["input_ids"]
    table = table_for(spec, model_type, prompt_index)
    logits, _, acts = per_token_activations(P, F, ids, lambda t: table(t, len(ids)), record=record, edits=edits)
    return logits, acts


def first(value):
    return value[0] if isinstance(value, tuple) else value


def traced(g: Grafter, specs, paths, body=None, prompts=PROMPTS, spans=SPANS):
    """Run g.trace on the prompts, saving every module in ``paths`` (forward order) and the
    logits; ``body(lm)`` adds the user's interventions first."""
    lm = g.model_envoy
    saved = {}
    with g.trace(specs, prompts, spans=spans):
        if body is not None:
            body(lm)
        for path in paths:
            saved[path] = first(lm.get(path).output).save()
        logits = lm.output.logits.save()
    return {k: v.detach() for k, v in saved.items()}, logits.detach()


def assert_rows_match(saved, logits, expected_logits, expected_acts, row, pad):
    torch.testing.assert_close(logits[row, pad:], expected_logits, atol=ATOL, rtol=RTOL)
    for path, value in expected_acts.items():
        torch.testing.assert_close(saved[path][row, pad:], value, atol=ATOL, rtol=RTOL, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("model_type", EXACTNESS_TYPES)
def test_activations_under_a_graft_equal_the_per_token_reference(model_type):
    """Mixed specs in one left-padded batch (FE+LT on the long prompt, last-token MLP on the short
    one): every attention output, MLP output and hidden state, at every position, equals the
    reference's; and they really are grafted (they differ from P's)."""
    _, _, _, g, _ = setup(model_type)
    paths = module_paths(model_type)
    saved, logits = traced(g, [FE_LT, LT_MLP], paths)
    lengths = [len(p) for p in g.tokenize(PROMPTS, SPANS)]
    for row, spec in enumerate([FE_LT, LT_MLP]):
        expected_logits, acts = reference(model_type, row, spec, record=paths)
        assert_rows_match(saved, logits, expected_logits, acts, row, max(lengths) - lengths[row])
    plain, _ = traced(g, GraftSpec(), paths)
    last_mlp = paths[-2]
    assert (saved[last_mlp][:, -1] - plain[last_mlp][:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", EXACTNESS_TYPES)
def test_user_interventions_compose_with_the_graft(model_type):
    """The user zeroes the first layer's MLP output at the last token (a module the graft also
    writes there: the user sees and edits the grafted value) and adds a steering vector to the
    first layer's hidden states at every position; equal to the reference with both edits."""
    P, _, _, g, adapter = setup(model_type)
    paths = module_paths(model_type)
    mlp0, block0 = paths[1], paths[2]
    steer = torch.linspace(-0.5, 0.5, P.config.hidden_size)
    seen = {}

    def body(lm):
        seen["mlp0"] = lm.get(mlp0).output[:, -1].clone().save()  # what the user sees: grafted
        lm.get(mlp0).output[:, -1] = 0
        out = lm.get(block0).output
        if isinstance(out, tuple):
            out[0][:] += steer
        else:
            out[:] += steer

    later = paths[3:]
    saved, logits = traced(g, FE_LT, later, body=body, prompts=PROMPTS[:1], spans=SPANS[:1])
    L = len(g.tokenize(PROMPTS[:1], SPANS[:1])[0])
    edits = {mlp0: lambda out, t: out * 0 if t == L - 1 else out, block0: lambda out, t: out + steer}
    expected_logits, acts = reference(model_type, 0, FE_LT, record=later, edits=edits)
    assert_rows_match(saved, logits, expected_logits, acts, 0, 0)
    _, grafted = reference(model_type, 0, FE_LT, record=[mlp0])
    torch.testing.assert_close(seen["mlp0"][0], grafted[mlp0][-1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_graft_inside_the_users_own_trace_and_session(model_type):
    """nngraft.graft in a trace the user opened on their own NNsight wrapper of P equals
    g.trace; in a session it composes with activation patching: the FE+LT run's last-token
    hidden state at layer 0, patched into a plain run of the other prompt, equals the reference
    with that patch."""
    P, _, _, g, _ = setup(model_type)
    paths = module_paths(model_type)
    block0 = paths[2]
    model = nnsight.NNsight(P)
    compiled = g.compile(FE_LT, PROMPTS, SPANS)
    with model.trace(**compiled.inputs):
        nngraft.graft(model, compiled)
        hidden = first(model.get(block0).output).save()
        logits = model.output.logits.save()
    saved, expected = traced(g, FE_LT, [block0])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden, saved[block0], atol=1e-6, rtol=0)

    source = g.compile(FE_LT, PROMPTS[:1], SPANS[:1])
    target = g.compile(GraftSpec(), PROMPTS[1:], SPANS[1:])
    with model.session():
        with model.trace(**source.inputs):
            nngraft.graft(model, source)
            patch = first(model.get(block0).output)[:, -1].clone()
        with model.trace(**target.inputs):
            nngraft.graft(model, target)
            out = model.get(block0).output
            (out[0] if isinstance(out, tuple) else out)[:, -1] = patch
            patched = model.output.logits[0, -1].save()
    _, acts = reference(model_type, 0, FE_LT, record=[block0])
    ids = setup(model_type)[2](PROMPTS[1])["input_ids"]
    edits = {block0: lambda o, t: acts[block0][-1].view_as(o) if t == len(ids) - 1 else o}
    expected_logits, _ = reference(model_type, 1, GraftSpec(), edits=edits)
    torch.testing.assert_close(patched, expected_logits[-1], atol=ATOL, rtol=RTOL)


def test_graft_errors_name_the_problem():
    P, _, _, g, _ = setup("llama")
    model = nnsight.NNsight(P)
    compiled = g.compile(FE_LT, PROMPTS, SPANS)
    with pytest.raises(TraceError, match=r"must be called inside an open trace"):
        nngraft.graft(model, compiled)
    with pytest.raises(TraceError, match=r"must be called first in the trace, before reading"):
        with model.trace(**compiled.inputs):
            model.model.embed_tokens.output.save()
            nngraft.graft(model, compiled)
    other = g.compile(FE_LT, PROMPTS[:1], SPANS[:1])
    with pytest.raises(ValueError, match=r"the trace runs input_ids of shape \(1, \d+\), but the graft was "
                                         r"compiled for other input_ids \(shape \(2, \d+\)"):
        with model.trace(**other.inputs):
            nngraft.graft(model, compiled)
            model.output.logits.save()
    gpt2 = nnsight.NNsight(tiny_pair("gpt2")[0])
    with pytest.raises(TraceError, match=r"compiled for a 'llama' model with 2 layers, but the traced model is 'gpt2'"):
        nngraft.graft(gpt2, compiled)
    with pytest.raises(TraceError, match=r"needs an nnsight envoy of P .* not Tensor"):
        nngraft.graft(torch.zeros(1), compiled)
