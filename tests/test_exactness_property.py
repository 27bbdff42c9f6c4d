"""Property-based: for random valid specs on tiny models, one pass equals the per-token reference.

The expected answer is built without the code under test: which positions a selector names and
which layers a layer selection means are evaluated here by hand, from the definitions in
docs/spec.md (``nngraft.plan.select_positions`` and ``nngraft.spec.resolve_layers`` are not used).
Only the span's token positions come from the tokenizer (tested in tests/compile/test_tokens.py) and the
component groups from the adapter (``attn``/``mlp`` proven equal to whole-module swaps in
tests/test_exactness.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nngraft import All, GraftRule, GraftSpec, Index, Last, Not, Other, Span

from tests.helpers.reference import component_swaps
from tests.helpers.exactness import PROMPT, SPANS, assert_close, one_pass, reference, setup, span_tokens

_leaf = st.one_of(
    st.just(Span(span="first_actor")), st.just(Last()), st.just(All()), st.just(Other()),
    st.builds(Index, index=st.lists(st.integers(-6, 5), min_size=1, max_size=3)),
)
_selector = st.one_of(_leaf, st.builds(lambda xs: Not(**{"not": xs}), st.lists(_leaf, min_size=1, max_size=2)))
_components = ["embed", "ln_attn", "q", "k", "v", "o", "ln_mlp", "up", "down", "ln_final", "lm_head", "attn", "mlp"]
_LAYERS = ["all", "first:1", "last:1", [0], [-1]]
_rule = st.builds(
    GraftRule,
    components=st.lists(st.sampled_from(_components), min_size=1, max_size=3),
    layers=st.sampled_from(_LAYERS),
    positions=st.lists(_selector, min_size=1, max_size=2),
)


def hand_layers(selection, n_layers: int) -> list[int]:
    """The layer selections the strategy draws, spelled out."""
    return {"all": list(range(n_layers)), "first:1": [0], "last:1": [n_layers - 1],
            "[0]": [0], "[-1]": [n_layers - 1]}[str(selection) if isinstance(selection, list) else selection]


def hand_mask(selector, n: int, entity: set[int], other: list[bool]) -> list[bool]:
    """For each position 0..n-1: does ``selector`` name it (docs/spec.md's definitions)?"""
    if isinstance(selector, Span):
        return [t in entity for t in range(n)]
    if isinstance(selector, Last):
        return [t == n - 1 for t in range(n)]
    if isinstance(selector, All):
        return [True] * n
    if isinstance(selector, Other):
        return list(other)
    if isinstance(selector, Index):
        wanted = {i if i >= 0 else n + i for i in selector.index}
        return [t in wanted for t in range(n)]
    if isinstance(selector, Not):
        inner = [hand_mask(s, n, entity, other) for s in selector.not_]
        return [not any(m[t] for m in inner) for t in range(n)]
    raise AssertionError(f"strategy drew an unexpected selector {selector!r}")


def expected_table(model_type: str, spec: GraftSpec):
    """Swaps per position, from the hand evaluation above."""
    P, _, _, g, adapter = setup(model_type)
    n = len(g.tokenize([PROMPT], [SPANS])[0])
    entity = span_tokens(model_type)
    # 'other' = the positions no non-'other' selector of the spec names ('other' inside such a
    # selector names nothing while this is worked out)
    nobody = [False] * n
    named = [any(hand_mask(s, n, entity, nobody)[t] for r in spec.rules for s in r.positions
                 if not isinstance(s, Other)) for t in range(n)]
    other = [not x for x in named]
    per_position: dict[int, set] = {}
    for rule in spec.rules:
        block, global_ = adapter.expand(list(rule.components))
        targets = [(c, None) for c in global_] + [(c, l) for l in hand_layers(rule.layers, g.n_layers)
                                                  for c in block]
        masks = [hand_mask(s, n, entity, other) for s in rule.positions]
        for t in range(n):
            if any(m[t] for m in masks):
                per_position.setdefault(t, set()).update(targets)
    swaps = {t: [s for c, l in sorted(targets, key=str) for s in component_swaps(P, adapter, c, l)]
             for t, targets in per_position.items()}
    return lambda t, L: swaps.get(t, [])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_type=st.sampled_from(["gpt2", "gpt_neox", "llama", "qwen3"]), rules=st.lists(_rule, min_size=1, max_size=3))
# always checked, whatever hypothesis draws: a complement (position 0 included), 'other' beside a
# span and the last token, and negative indices
@example(model_type="llama", rules=[GraftRule(components=["mlp"], positions=[Not(**{"not": [Last()]})])])
@example(model_type="gpt2", rules=[GraftRule(components=["q", "v"], positions=[Span(span="first_actor")]),
                                   GraftRule(components=["down"], layers="last:1", positions=[Last()]),
                                   GraftRule(components=["embed"], positions=[Other()])])
@example(model_type="qwen3", rules=[GraftRule(components=["o", "up"], layers=[-1], positions=[Index(index=[-2, 0])])])
def test_random_specs_match_reference(model_type, rules):
    spec = GraftSpec(rules=rules)
    _, _, _, g, _ = setup(model_type)
    expected, _ = reference(model_type, PROMPT, expected_table(model_type, spec))
    assert_close(one_pass(g, spec), expected)


def test_hand_evaluation_of_selectors():
    """The oracle's own selector semantics on a 6-token prompt (entity = tokens 1, 2)."""
    n, entity, none = 6, {1, 2}, [False] * 6
    pick = lambda s, other=none: [t for t, x in enumerate(hand_mask(s, n, entity, other)) if x]  # noqa: E731
    assert pick(Last()) == [5] and pick(All()) == [0, 1, 2, 3, 4, 5] and pick(Span(span="x")) == [1, 2]
    assert pick(Index(index=[-1, 0, -6])) == [0, 5]
    assert pick(Not(**{"not": [Last()]})) == [0, 1, 2, 3, 4]
    assert pick(Not(**{"not": [Span(span="x"), Index(index=[0])]})) == [3, 4, 5]
    assert pick(Other(), [t in (0, 3) for t in range(n)]) == [0, 3]
    assert hand_layers("last:1", 2) == [1] and hand_layers([-1], 2) == [1] and hand_layers("all", 2) == [0, 1]
