"""Parameter-level grafts (rule.weights): one pass equals the per-token reference run with the
partially updated weights W_P + ΔW_partial, computed here independently."""

from __future__ import annotations

import math

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span, SpecError
from nngraft.arch import get_module
from nngraft.donors.partial import low_rank, top_entries
from nngraft.spec import WeightSelection, resolve_layers

from tests.helpers.reference import per_token_reference
from tests.helpers.exactness import PROMPT, SPANS, assert_close, one_pass, setup, span_tokens, swaps
from tests.helpers import ROOT


def partial_model(P, F, params: dict[str, torch.Tensor]):
    """A copy of F whose listed parameters are replaced (the rest do not matter: not grafted)."""
    import copy

    G = copy.deepcopy(F)
    for name, value in params.items():
        owner, _, leaf = name.rpartition(".")
        getattr(get_module(G, owner), leaf).data.copy_(value)
    return G


def names_of(swap_list):
    return sorted({name for name, *_ in swap_list})


def expected_top(P, F, names, percent, per_layer=False):
    pp, fp = dict(P.named_parameters(remove_duplicate=False)), dict(F.named_parameters(remove_duplicate=False))
    out = {}
    if not per_layer:
        for n in names:
            d = (fp[n] - pp[n]).detach()
            k = math.ceil(d.numel() * percent / 100)
            thresh = d.abs().flatten().sort(descending=True).values[k - 1]
            out[n] = pp[n].detach() + d * (d.abs() >= thresh)
        return out
    by_layer = {}
    for n in names:
        by_layer.setdefault(n.split(".layers.")[1].split(".")[0], []).append(n)
    for group in by_layer.values():
        ds = {n: (fp[n] - pp[n]).detach() for n in group}
        flat = torch.cat([d.flatten() for d in ds.values()])
        k = math.ceil(flat.numel() * percent / 100)
        thresh = flat.abs().sort(descending=True).values[k - 1]
        out.update({n: pp[n].detach() + d * (d.abs() >= thresh) for n, d in ds.items()})
    return out


def expected_rank(P, F, names, r):
    pp, fp = dict(P.named_parameters()), dict(F.named_parameters())
    out = {}
    for n in names:
        d = (fp[n] - pp[n]).detach()
        if d.ndim == 2:
            u, s, vh = torch.linalg.svd(d.double())
            d = ((u[:, :r] * s[:r]) @ vh[:r]).float()
        out[n] = pp[n].detach() + d
    return out


def masked_delta(fill_mask):
    """``params_for`` for :func:`check`: P + (F - P) * mask, where ``fill_mask(name, mask)`` sets
    the entries of each parameter's zero mask to keep."""
    def params_for(P, F, names):
        pp, fp = dict(P.named_parameters()), dict(F.named_parameters())
        out = {}
        for n in names:
            d = (fp[n] - pp[n]).detach()
            mask = torch.zeros_like(d)
            fill_mask(n, mask)
            out[n] = pp[n].detach() + d * mask
        return out
    return params_for


def check(model_type, rule: GraftRule, params_for, positions):
    P, F, tok, g, adapter = setup(model_type)
    comps = adapter.expand(list(rule.components))[0]
    sw = swaps(model_type, comps, layers=resolve_layers(rule.layers, g.n_layers))
    G = partial_model(P, F, params_for(P, F, names_of(sw)))
    ids = tok(PROMPT)["input_ids"]
    expected, _ = per_token_reference(P, G, ids, lambda t: sw if t in positions(len(ids)) else [])
    actual = one_pass(g, GraftSpec(rules=[rule]))
    assert_close(actual, expected)
    full = one_pass(g, GraftSpec(rules=[rule.model_copy(update={"weights": None})]))
    assert not torch.allclose(actual, full, atol=1e-4), "a partial graft must differ from the full one"
    return actual


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_top_percent_per_tensor(model_type):
    rule = GraftRule(components=["mlp", "o"], positions=[Last()], weights=WeightSelection(top_percent=10))
    check(model_type, rule, lambda P, F, names: expected_top(P, F, names, 10), lambda L: {L - 1})


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_top_percent_per_layer(model_type):
    rule = GraftRule(components=["attn", "mlp"], positions=[Span(span="first_actor"), Last()],
                     weights=WeightSelection(top_percent=5, per="layer"))
    fe = span_tokens(model_type)
    check(model_type, rule, lambda P, F, names: expected_top(P, F, names, 5, per_layer=True),
          lambda L: fe | {L - 1})


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rank(model_type):
    rule = GraftRule(components=["mlp"], layers="last:1", positions=[Last()], weights=WeightSelection(rank=2))
    check(model_type, rule, lambda P, F, names: expected_rank(P, F, names, 2), lambda L: {L - 1})


def test_neurons_heads_rows_columns():
    P, F, tok, g, adapter = setup("llama")
    sliced = masked_delta

    def neurons(n, m):  # rows of gate/up, columns of down
        if "down_proj" in n:
            m[:, [3, 7]] = 1
        else:
            m[[3, 7]] = 1
    check("llama", GraftRule(components=["mlp"], positions=[Last()], weights=WeightSelection(neurons=[3, 7])),
          sliced(neurons), lambda L: {L - 1})

    head_dim = P.config.head_dim

    def heads(n, m):  # head 1: rows of q/k/v, columns of o
        cols = list(range(head_dim, 2 * head_dim))
        if "o_proj" in n:
            m[:, cols] = 1
        else:
            m[cols] = 1
    check("llama", GraftRule(components=["attn"], positions=[Last()], weights=WeightSelection(heads=[1])),
          sliced(heads), lambda L: {L - 1})

    def columns(n, m):
        m[:, [0, 5]] = 1
    check("llama", GraftRule(components=["up"], positions=[Last()], weights=WeightSelection(columns=[0, 5])),
          sliced(columns), lambda L: {L - 1})


def test_gpt2_rows_follow_linear_orientation():
    """GPT-2's Conv1D stores (in, out): 'rows' (output features) are its columns, and the bias."""
    def rows(n, mask):
        if mask.ndim == 2:
            mask[:, [1, 4]] = 1
        else:
            mask[[1, 4]] = 1
    check("gpt2", GraftRule(components=["up"], positions=[Last()], weights=WeightSelection(rows=[1, 4])),
          masked_delta(rows), lambda L: {L - 1})


def test_gpt2_heads_of_o_are_input_rows_of_its_conv1d():
    """Heads of GPT-2's o (c_proj, not fused): its input features, which Conv1D stores as rows;
    the adapter (not a model_type check) says only q/k/v are fused."""
    P, _, _, _, adapter = setup("gpt2")
    head_dim = adapter.head_dim(P.config)

    def head_1(n, mask):
        if mask.ndim == 2:
            mask[head_dim:2 * head_dim] = 1
    check("gpt2", GraftRule(components=["o"], positions=[Last()], weights=WeightSelection(heads=[1])),
          masked_delta(head_1), lambda L: {L - 1})


def test_selection_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        WeightSelection(rank=2, top_percent=5)
    with pytest.raises(ValueError, match="per: 'layer' only applies to top_percent"):
        WeightSelection(rank=2, per="layer")
    _, _, _, g, _ = setup("llama")
    with pytest.raises(SpecError, match="weights.heads selects attention heads; 'up'"):
        g.run(GraftSpec(rules=[GraftRule(components=["up"], positions=[Last()], weights=WeightSelection(heads=[0]))]), [PROMPT])
    with pytest.raises(SpecError, match=r"weights selection \[99\] is out of range for model.layers.0.mlp.up_proj.weight"):
        g.run(GraftSpec(rules=[GraftRule(components=["up"], positions=[Last()], weights=WeightSelection(rows=[99]))]), [PROMPT])
    _, _, _, g2, _ = setup("gpt2")
    with pytest.raises(SpecError, match="not supported on fused QKV"):
        g2.run(GraftSpec(rules=[GraftRule(components=["q"], positions=[Last()], weights=WeightSelection(heads=[0]))]), [PROMPT])


def test_helpers():
    d = torch.tensor([[1.0, -4.0, 2.0, 0.5]])
    assert top_entries(d, 50).tolist() == [[0.0, -4.0, 2.0, 0.0]]
    m = torch.randn(6, 5)
    approx, err = low_rank(m, 5)
    assert torch.allclose(approx, m, atol=1e-5) and err < 1e-6
    approx, err = low_rank(m, 1)
    assert 0 < err < 1 and torch.linalg.matrix_rank(approx) == 1


def test_json_round_trip_with_weights():
    spec = GraftSpec.from_json('{"rules": [{"components": ["mlp"], "positions": [{"last": true}], '
                               '"weights": {"top_percent": 5, "per": "layer"}}]}')
    assert spec.rules[0].weights.top_percent == 5
    assert GraftSpec.from_json(spec.to_json()) == spec


def test_delta_fraction_recipe(tmp_path, monkeypatch):
    """The 'how much of ΔW is needed' recipe runs end to end on a tiny pair; on a 32-wide model
    rank 32 keeps all of ΔW, so it must equal keeping 100 %."""
    import sys
    from pathlib import Path

    from nngraft.study.results import load_results

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.chdir(tmp_path)
    import delta_fraction

    assert delta_fraction.main(["--tiny", "--n", "3", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = load_results(tmp_path / "out" / "results.jsonl")
    by_spec: dict[str, dict[str, float]] = {}
    for row in rows:
        by_spec.setdefault(row["spec"], {})[row["fact_id"]] = row["prob"]
    assert set(by_spec) >= {"p", "f", "fe_lt_top1", "fe_lt_top100", "fe_lt_rank1", "fe_lt_rank32"}
    assert all(len(v) == 3 for v in by_spec.values())
    for fact, prob in by_spec["fe_lt_top100"].items():
        assert abs(by_spec["fe_lt_rank32"][fact] - prob) < 1e-6
    assert any(abs(by_spec["fe_lt_rank1"][f] - p) > 1e-6 for f, p in by_spec["fe_lt_top100"].items())
    assert (tmp_path / "out" / "delta_fraction.png").exists()
