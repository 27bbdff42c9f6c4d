"""Rows that share a prompt compute its ungrafted prefix once (nngraft.compile.schedule): the numbers equal
the per-token reference and the plain one-pass run, on every architecture, and the shared path
really runs (counted forward passes), falls back where a cache cannot hold the prefix, and is
scheduled sensibly."""

from __future__ import annotations

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Index, Last, Not, Other, Span
from nngraft.compile.schedule import Row, forward_on_prefix, schedule_rows, shareable_prefixes
from nngraft.testing import TINY_MODEL_TYPES, perturbed_copy, tiny_config, tiny_pair, tiny_tokenizer

from tests.helpers.exactness import assert_close, reference, setup, span_tokens, swaps

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Marie Curie stars in",
           "Q: Who stars in a movie with Grace Hopper? A: An actor named"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Marie Curie"}, {"first_actor": "Grace Hopper"}]


def grid_specs() -> list[GraftSpec]:
    """Specs whose first grafted position varies: none, the last token, the entity, token 2,
    complements (``other``, ``not``) and a parameter-level graft."""
    fe = Span(span="first_actor")
    return [
        GraftSpec(name="p"),
        GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])]),
        GraftSpec(name="lt_all", rules=[GraftRule(components=["all"], positions=[Last()])]),
        GraftSpec(name="fe", rules=[GraftRule(components=["all"], positions=[fe])]),
        GraftSpec(name="fe_lt_attn", rules=[GraftRule(components=["attn"], positions=[fe, Last()])]),
        GraftSpec(name="kv_at_2", rules=[GraftRule(components=["k", "v"], positions=[Index(index=[2])])]),
        GraftSpec(name="other", rules=[GraftRule(components=["mlp"], positions=[Last()]),
                                       GraftRule(components=["o"], positions=[Other()])]),
        GraftSpec(name="not_fe", rules=[GraftRule(components=["mlp"], positions=[Not(not_=[fe])])]),
        GraftSpec(name="lt_top", rules=[GraftRule(components=["mlp"], positions=[Last()],
                                                  weights={"top_percent": 10})]),
        # the same grafts as "fe" before the last token: these three share one grafted prefix
        GraftSpec(name="fe_lt_mlp", rules=[GraftRule(components=["all"], positions=[fe]),
                                           GraftRule(components=["mlp"], layers="last:1", positions=[Last()])]),
        GraftSpec(name="fe_lt_o", rules=[GraftRule(components=["o"], positions=[Last()]),
                                         GraftRule(components=["all"], positions=[fe])]),
        # a parameter-level graft at the entity, shared by two rows
        GraftSpec(name="fe_top", rules=[GraftRule(components=["mlp"], positions=[fe], weights={"top_percent": 10})]),
        GraftSpec(name="fe_top_lt", rules=[GraftRule(components=["mlp"], positions=[fe], weights={"top_percent": 10}),
                                           GraftRule(components=["attn"], positions=[Last()])]),
    ]


class PassCounter:
    """Counts forward passes of a Grafter by kind: ``prefix`` (plain, building a cache),
    ``suffix`` (run on a shared cache) and ``plain``."""

    def __init__(self, grafter: Grafter, monkeypatch) -> None:
        self.calls: list[str] = []
        self.grafted_prefixes = 0  # prefix passes that carried grafts
        self.gaps = 0  # suffix passes whose mask has a masked gap mid-sequence
        original = grafter.forward

        def counted(plan, batch, **kwargs):
            kind = "suffix" if kwargs.get("cache") is not None else "prefix" if kwargs.get("use_cache") else "plain"
            self.calls.append(kind)
            if kind == "prefix" and plan.modules:
                self.grafted_prefixes += 1
            if kind == "suffix":  # a masked gap: a 0 after a 1 in some row of the attention mask
                mask = batch.attention_mask
                self.gaps += int(((mask[:, 1:] == 0) & (mask.cummax(dim=1).values[:, :-1] == 1)).any())
            return original(plan, batch, **kwargs)

        monkeypatch.setattr(grafter, "forward", counted)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_shared_prefix_equals_plain_pass(model_type, monkeypatch):
    """Every spec of a grid, sharing on vs off: the same last-token logits; sharing really ran."""
    P, F, tok = tiny_pair(model_type)
    # call_cost=0: share whenever positions are saved (a tiny model's default would not share)
    shared, plain = Grafter(P, F, tok, call_cost=0), Grafter(P, F, tok, share_prefix=False)
    counter = PassCounter(shared, monkeypatch)
    specs = grid_specs()
    a = shared.run_grid(specs, PROMPTS, SPANS, batch_size=16)
    b = plain.run_grid(specs, PROMPTS, SPANS, batch_size=16)
    assert "suffix" in counter.calls and "prefix" in counter.calls and counter.grafted_prefixes
    for spec in specs:
        assert_close(a[spec.name].logits, b[spec.name].logits)
    # and the grafts did something (a test of sharing must not pass on ungrafted rows)
    assert (a["fe"].logits - a["p"].logits).abs().max() > 1e-2
    assert (a["lt_mlp"].logits - a["p"].logits).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma3_text", "olmo2"])
def test_shared_prefix_equals_per_token_reference(model_type, monkeypatch):
    """The shared-prefix path against the literal per-token weight swap, row by row."""
    P, F, tok, _, _ = setup(model_type)
    g = Grafter(P, F, tok, call_cost=0)
    counter = PassCounter(g, monkeypatch)
    every, mlp_last = swaps(model_type, ["all"]), swaps(model_type, ["mlp"], layers=[g.n_layers - 1])
    attn, kv, o = swaps(model_type, ["attn"]), swaps(model_type, ["k", "v"]), swaps(model_type, ["o"])
    specs = {s.name: s for s in grid_specs()}
    tables = {
        "p": lambda fe: lambda t, L: [],
        "lt_mlp": lambda fe: lambda t, L: mlp_last if t == L - 1 else [],
        "lt_all": lambda fe: lambda t, L: every if t == L - 1 else [],
        "fe": lambda fe: lambda t, L: every if t in fe else [],
        "fe_lt_attn": lambda fe: lambda t, L: attn if t in fe or t == L - 1 else [],
        "kv_at_2": lambda fe: lambda t, L: kv if t == 2 else [],
        "fe_lt_mlp": lambda fe: lambda t, L: every if t in fe else (mlp_last if t == L - 1 else []),
        "fe_lt_o": lambda fe: lambda t, L: every if t in fe else (o if t == L - 1 else []),
    }
    grid = g.run_grid([specs[n] for n in tables], PROMPTS, SPANS, batch_size=32)
    assert "suffix" in counter.calls and counter.grafted_prefixes
    for name, table in tables.items():
        for i, (prompt, spans) in enumerate(zip(PROMPTS, SPANS)):
            expected, _ = reference(model_type, prompt, table(span_tokens(model_type, prompt, spans)))
            assert_close(grid[name].logits[i], expected[-1])


def test_sdpa_attention_with_a_gap_in_the_mask(monkeypatch):
    """Real checkpoints use SDPA attention. Rows of one pass whose suffixes differ in length are
    left-padded after the shared prefix, and a row that takes fewer prefix positions than its
    prefix pass computed masks the rest: masked gaps mid-sequence. Results still equal the plain
    pass (the pass is built by hand here; the scheduler forms such passes when they are cheaper)."""
    from transformers import AutoModelForCausalLM

    from nngraft.compile.schedule import SharedPrefix
    from nngraft.compile.plan import compile_plan

    torch.manual_seed(0)
    tok = tiny_tokenizer("llama")
    P = AutoModelForCausalLM.from_config(tiny_config("llama", 2, len(tok)), attn_implementation="sdpa").eval()
    F = perturbed_copy(P)
    g, plain = Grafter(P, F, tok), Grafter(P, F, tok, share_prefix=False)
    counter = PassCounter(g, monkeypatch)
    by_name = {s.name: s for s in grid_specs()}
    names = ["lt_mlp", "kv_at_2", "p", "fe_lt_mlp", "fe_lt_o", "lt_top"]
    specs = [by_name[n] for n in names] * 2
    prompts = g.tokenize([PROMPTS[0]] * 6 + [PROMPTS[2]] * 6, [SPANS[0]] * 6 + [SPANS[2]] * 6)
    shares = shareable_prefixes(specs, prompts)
    assert [s.length for s in shares[:6]] == [len(prompts[0]) - 1, 2, len(prompts[0]) - 1,
                                             len(prompts[0]) - 1, len(prompts[0]) - 1, len(prompts[0]) - 1]
    assert shares[3].spec is not None and shares[3].key == shares[4].key != shares[0].key  # a grafted prefix
    plan = compile_plan(specs, g.adapter, P.config, prompts)
    logits = forward_on_prefix(g.forward, plan, prompts, shares, adapter=g.adapter, config=P.config,
                               device=g.device, pad_id=g.pad_id)
    assert counter.gaps == 1 and counter.grafted_prefixes == 1
    expected = plain.run(specs, [p.text for p in prompts], [SPANS[0]] * 6 + [SPANS[2]] * 6).logits
    assert_close(logits[:, -1], expected)


def test_sliding_window_cache_falls_back_to_the_plain_pass(monkeypatch):
    """Gemma-2's sliding-window layers keep only the last ``sliding_window`` keys: a longer prefix
    cannot be shared, so those rows run plainly — with the right numbers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer("llama")
    config = tiny_config("gemma2", 2, len(tok))
    config.sliding_window = 3
    P = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    F = perturbed_copy(P)
    shared, plain = Grafter(P, F, tok, call_cost=0), Grafter(P, F, tok, share_prefix=False)
    counter = PassCounter(shared, monkeypatch)
    specs = grid_specs()[:3]  # prefixes of 5+ tokens, longer than the window
    a = shared.run_grid(specs, PROMPTS, SPANS)
    b = plain.run_grid(specs, PROMPTS, SPANS)
    assert "prefix" in counter.calls and "suffix" not in counter.calls and "plain" in counter.calls
    for spec in specs:
        assert_close(a[spec.name].logits, b[spec.name].logits)


def test_no_sharing_when_every_prompt_is_used_once_or_all_logits(monkeypatch):
    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok, call_cost=0, check_identities=False)  # passes are counted
    counter = PassCounter(g, monkeypatch)
    spec = grid_specs()[1]
    g.run(spec, PROMPTS, SPANS)  # three different prompts, one spec
    g.run([spec, grid_specs()[2]], [PROMPTS[0]] * 2, [SPANS[0]] * 2, all_logits=True)
    assert counter.calls == ["plain", "plain"]


def test_default_call_cost_follows_model_size(monkeypatch):
    """A tiny model's passes are all fixed cost: by default its grid runs as one plain pass. A
    model of SmolLM2's size (built on the meta device) is priced at about 15 positions per pass."""
    from transformers import AutoModelForCausalLM

    from nngraft.compile.schedule import CALL_SECONDS, CALL_SECONDS_PER_LAYER, CPU_FLOPS, default_call_cost

    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok, check_identities=False)  # passes are counted
    counter = PassCounter(g, monkeypatch)
    g.run_grid(grid_specs(), PROMPTS, SPANS, batch_size=64)
    assert counter.calls == ["plain"]
    config = tiny_config("llama", 30, 49152)
    config.update(dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64))
    with torch.device("meta"):
        smol = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in smol.parameters())
    assert 130e6 < n < 140e6
    fixed = CALL_SECONDS + 30 * CALL_SECONDS_PER_LAYER
    assert default_call_cost(smol, 30) == pytest.approx(fixed * CPU_FLOPS / (2 * n))
    assert 10 < default_call_cost(smol, 30) < 25


def test_schedule_covers_every_row_once_within_batch_size():
    rows = [Row(i, key=i % 3, length=10 + i % 3, prefix=(i * 7) % 10) for i in range(50)]
    for size in (1, 4, 32):
        chunks = schedule_rows(rows, batch_size=size, call_cost=16)
        assert sorted(i for c in chunks for i in c.indices) == list(range(50))
        assert all(1 <= len(c.indices) <= size for c in chunks)
    assert schedule_rows(rows, 8, 16) == schedule_rows(list(reversed(rows)), 8, 16)  # order-free


def test_schedule_shares_when_it_saves_work_and_splits_by_suffix():
    # 30 specs at the last token of a 20-token prompt, 2 at its start (suffix 19)
    rows = [Row(i, key="a", length=20, prefix=19) for i in range(30)]
    rows += [Row(30 + i, key="a", length=20, prefix=1) for i in range(2)]
    chunks = schedule_rows(rows, batch_size=32, call_cost=16)
    assert [(sorted(c.indices), c.shared) for c in chunks] == [(list(range(30)), True), ([30, 31], False)]
    # when a forward pass costs as much as hundreds of positions (a GPU), one chunk
    assert [c.shared for c in schedule_rows(rows, batch_size=32, call_cost=1024)] == [False]
    # a prompt used once has nothing to share
    assert [c.shared for c in schedule_rows([Row(0, "a", 20, 0)], 32, 16)] == [False]
