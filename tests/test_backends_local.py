"""nngraft.backends.local: LocalBackend (loading, passes with and without a plan, KV cache,
keeping only the last column's logits) and apply_plan / donor_forward, where grafts are applied."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from nngraft import All, DonorMismatchError, GraftRule, GraftSpec, Grafter, Last
from nngraft.arch import adapter_for
from nngraft.backends.local import LocalBackend, donor_forward, swapped_parameters
from nngraft.donor import ModelDonor, pick_donor
from nngraft.plan import compile_plan
from nngraft.testing import tiny_pair
from nngraft.tokens import PaddedBatch, pad_left

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
PROMPT, SPAN = PROMPTS[0], SPANS[0]


@lru_cache(maxsize=None)
def setup(model_type: str = "llama"):
    P, F, tok = tiny_pair(model_type)
    return P, F, tok, Grafter(P, F, tok)


def attached(model_type: str) -> LocalBackend:
    P, F, tok, _ = setup(model_type)
    backend = LocalBackend()
    backend.attach(P, F, tok)
    return backend


def test_attach_wraps_the_model_and_makes_donors():
    P, F, tok, _ = setup("llama")
    backend = attached("llama")
    assert backend.model is P and backend.tokenizer is tok and backend.adapter is adapter_for(P)
    assert isinstance(backend.donors["default"], ModelDonor) and backend.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"Grafter: tokenizer: Input should be the recipient's tokenizer \(Grafter\(P, F, tokenizer\)\), got None"):
        LocalBackend().attach(P, F, None)


def test_an_empty_plan_is_a_plain_forward_bit_for_bit():
    P, _, tok, g = setup("llama")
    backend = attached("llama")
    [prompt] = g.tokenize([PROMPT])
    batch = pad_left([prompt.ids], g.pad_id)
    plan = compile_plan([GraftSpec()], backend.adapter, P.config, [prompt])
    logits, cache = backend.forward(plan, batch, keep_all=True)
    with torch.no_grad():
        expected = P(input_ids=batch.input_ids).logits
    assert cache is None and torch.equal(logits, expected)


def test_keeping_only_the_last_column_equals_keeping_all_even_with_an_lm_head_graft():
    P, _, _, g = setup("gpt2")
    backend = attached("gpt2")
    spec = GraftSpec(rules=[GraftRule(components=["lm_head", "mlp"], positions=[Last()])])
    prompts = g.tokenize(PROMPTS, SPANS)
    batch = pad_left([p.ids for p in prompts], g.pad_id)
    plan = compile_plan([spec, spec], backend.adapter, P.config, prompts)
    last, _ = backend.forward(plan, batch)
    full, _ = backend.forward(plan, batch, keep_all=True)
    assert last.shape[1] == 1 and full.shape[1] == batch.input_ids.shape[1]
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    plain, _ = backend.forward(compile_plan([GraftSpec()] * 2, backend.adapter, P.config, prompts), batch)
    assert (last - plain).abs().max() > 1e-3  # the head graft did something


def test_a_cache_is_returned_and_continues_the_sequence():
    P, _, _, g = setup("llama")
    backend = attached("llama")
    [prompt] = g.tokenize([PROMPT])
    ids = list(prompt.ids)
    empty = compile_plan([GraftSpec()], backend.adapter, P.config, [prompt])
    head = pad_left([ids[:-1]], g.pad_id)
    _, cache = backend.forward(empty.last_columns(len(ids) - 1), head, use_cache=True)
    assert cache is not None
    step = PaddedBatch(torch.tensor([ids[-1:]]), torch.ones(1, len(ids), dtype=torch.long),
                       torch.tensor([[len(ids) - 1]]), (0,))
    logits, _ = backend.forward(empty.last_columns(1), step, cache=cache)
    with torch.no_grad():
        expected = P(input_ids=torch.tensor([ids])).logits[:, -1]
    torch.testing.assert_close(logits[:, -1], expected, atol=1e-5, rtol=1e-5)


def test_grafting_never_modifies_weights():
    P, F, _, g = setup("llama")
    before = {n: p.clone() for n, p in P.named_parameters()}
    g.run(GraftSpec(rules=[GraftRule(components=["everything"], positions=[All()])]), [PROMPT], [SPAN])
    assert all(torch.equal(before[n], p) for n, p in P.named_parameters())


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_donor_forward_equals_the_donor_module(model_type):
    """Linear and GPT-2 Conv1D are computed directly; other modules run with F's parameters
    swapped in. Each equals F's own module on the same input."""
    P, F, _, _ = setup(model_type)
    adapter = adapter_for(P)
    paths = [s.path for c in ("q", "down", "ln_attn") for s in adapter.sites(c, 0, P.config)]
    for path in dict.fromkeys(paths):
        mine, theirs = P.get_submodule(path), F.get_submodule(path)
        x = torch.randn(2, 3, next(mine.parameters()).shape[-1 if "ln" in path else 0 if model_type == "gpt2" else -1])
        params = dict(theirs.named_parameters())
        with torch.no_grad():
            got = donor_forward(mine, mine, params, x)
            torch.testing.assert_close(got, theirs(x), atol=1e-6, rtol=1e-6)


def test_swapped_parameters_are_restored_even_on_error():
    P, F, _, _ = setup("llama")
    module = P.model.layers[0].mlp.up_proj
    before = module.weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_parameters(module, {"weight": F.model.layers[0].mlp.up_proj.weight}):
            assert torch.equal(module.weight, F.model.layers[0].mlp.up_proj.weight)
            raise RuntimeError("boom")
    assert torch.equal(module.weight, before)


def test_a_missing_named_donor_is_named_with_the_way_to_add_it():
    with pytest.raises(DonorMismatchError, match=r"donor 'h', but this run has donors \['default'\]; pass it with "
                                                 r"donors=\{'h': \.\.\.\}"):
        pick_donor({"default": object()}, "h")
