"""The exactness tests' shared set-up: tiny P/F pairs, one pass of nngraft, the per-token reference
run on the same prompt, and the tolerance they are compared with."""

from __future__ import annotations

from functools import lru_cache

import torch

from nngraft import GraftSpec, Grafter
from nngraft.arch import adapter_for
from nngraft.testing import tiny_pair

from tests.helpers.reference import component_swaps, per_token_reference


PROMPT = "Ada Lovelace stars in a movie alongside"


SPANS = {"first_actor": "Ada Lovelace"}


ATOL, RTOL = 2e-5, 1e-4


@lru_cache(maxsize=None)
def setup(model_type: str):
    P, F, tok = tiny_pair(model_type)
    return P, F, tok, Grafter(P, F, tok), adapter_for(P)


def one_pass(g: Grafter, spec: GraftSpec, prompt: str = PROMPT, spans=SPANS) -> torch.Tensor:
    return g.run(spec, [prompt], [spans], all_logits=True).all_logits[0]


def reference(model_type: str, prompt: str, table, new_tokens: int = 0):
    """``table(t, L)`` -> list of swaps active at token t of a prompt of L tokens."""
    P, F, tok, _, _ = setup(model_type)
    ids = tok(prompt)["input_ids"]
    return per_token_reference(P, F, ids, lambda t: table(t, len(ids)), new_tokens=new_tokens)


def swaps(model_type: str, components, layers=None):
    P, _, _, g, adapter = setup(model_type)
    layers = range(g.n_layers) if layers is None else layers
    block, global_ = adapter.expand(list(components))  # groups such as 'mlp' -> gate, up, down
    out = [s for c in global_ for s in component_swaps(P, adapter, c, None)]
    for c in block:
        for layer in layers:
            out += component_swaps(P, adapter, c, layer)
    assert out, f"no weights for {components}"
    return out


def span_tokens(model_type: str, prompt=PROMPT, spans=SPANS, name="first_actor") -> set[int]:
    _, _, _, g, _ = setup(model_type)
    return set(g.tokenize([prompt], [spans])[0].spans[name])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
