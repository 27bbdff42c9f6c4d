"""Property-based: for random valid specs on tiny models, one pass equals the per-token reference."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nngraft import All, GraftRule, GraftSpec, Index, Last, Not, Other, Span
from nngraft.compile.plan import select_positions
from nngraft.spec import resolve_layers

from .reference import component_swaps
from .test_exactness import PROMPT, SPANS, assert_close, one_pass, reference, setup

_leaf = st.one_of(
    st.just(Span(span="first_actor")), st.just(Last()), st.just(All()), st.just(Other()),
    st.builds(Index, index=st.lists(st.integers(-6, 5), min_size=1, max_size=3)),
)
_selector = st.one_of(_leaf, st.builds(lambda xs: Not(**{"not": xs}), st.lists(_leaf, min_size=1, max_size=2)))
_components = ["embed", "ln_attn", "q", "k", "v", "o", "ln_mlp", "up", "down", "ln_final", "lm_head", "attn", "mlp"]
_rule = st.builds(
    GraftRule,
    components=st.lists(st.sampled_from(_components), min_size=1, max_size=3),
    layers=st.sampled_from(["all", "first:1", "last:1", [0], [-1]]),
    positions=st.lists(_selector, min_size=1, max_size=2),
)


def expected_table(model_type: str, spec: GraftSpec):
    """Swaps per position, derived from the (separately tested) selector and layer resolution."""
    P, _, _, g, adapter = setup(model_type)
    prompt = g.tokenize([PROMPT], [SPANS])[0]
    n = len(prompt)
    named = set()
    for rule in spec.rules:
        for s in rule.positions:
            if not isinstance(s, Other):
                named |= select_positions(s, prompt)
    other = frozenset(set(range(n)) - named)
    per_position: dict[int, set] = {}
    for rule in spec.rules:
        block, global_ = adapter.expand(list(rule.components))
        targets = [(c, None) for c in global_] + [(c, l) for l in resolve_layers(rule.layers, g.n_layers) for c in block]
        positions = set().union(*(select_positions(s, prompt, other=other) for s in rule.positions))
        for t in positions:
            per_position.setdefault(t, set()).update(targets)
    swaps = {t: [s for c, l in sorted(targets, key=str) for s in component_swaps(P, adapter, c, l)]
             for t, targets in per_position.items()}
    return lambda t, L: swaps.get(t, [])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_type=st.sampled_from(["gpt2", "gpt_neox", "llama", "qwen3"]), rules=st.lists(_rule, min_size=1, max_size=3))
def test_random_specs_match_reference(model_type, rules):
    spec = GraftSpec(rules=rules)
    _, _, _, g, _ = setup(model_type)
    expected, _ = reference(model_type, PROMPT, expected_table(model_type, spec))
    assert_close(one_pass(g, spec), expected)
