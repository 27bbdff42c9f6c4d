"""nngraft.backends.local: LocalBackend (loading, passes with and without a plan, KV cache,
keeping only the last column's logits) and apply_plan / module_forward, where grafts are applied —
replacing P's computation at the grafted cells instead of adding to it."""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nngraft import All, DonorMismatchError, GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.arch import adapter_for
from nngraft.backends.setup import Here, Setup
from nngraft.backends.local import (Layouts, LocalBackend, Scratch, module_forward, replaced_output,
                                    swapped_parameters)
from nngraft.donors.donor import ModelDonor, pick_donor
from nngraft.errors import UnsupportedArchitectureError
from nngraft.compile.plan import GraftPlan, ModuleGraft, compile_plan
from nngraft.testing import tiny_pair
from nngraft.compile.tokens import PaddedBatch, pad_left

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
PROMPT, SPAN = PROMPTS[0], SPANS[0]


@lru_cache(maxsize=None)
def setup(model_type: str = "llama"):
    P, F, tok = tiny_pair(model_type)
    return P, F, tok, Grafter(P, F, tok)


class Attached:
    """A LocalBackend and the set-up it runs on, called as the Grafter calls it."""

    def __init__(self, model_type: str) -> None:
        P, F, tok, _ = setup(model_type)
        self.backend, self.setup = LocalBackend(), Setup.build(P, F, tok, placement=LocalBackend().placement(P))
        self.adapter = self.setup.adapter

    def forward(self, plan, batch, **kwargs):
        return self.backend(self.setup, plan, batch, **kwargs)


def attached(model_type: str) -> Attached:
    return Attached(model_type)


def test_the_setup_wraps_the_model_and_makes_donors_once():
    P, F, tok, _ = setup("llama")
    built = Setup.build(P, F, tok, placement=Here())
    assert built.model is P and built.tokenizer is tok and built.adapter is adapter_for(P)
    assert isinstance(built.donors["default"], ModelDonor) and built.device == torch.device("cpu")
    assert isinstance(LocalBackend().placement(P), Here)
    with pytest.raises(ValueError, match=r"Grafter: tokenizer: Input should be the recipient's tokenizer \(Grafter\(P, F, tokenizer\)\), got None"):
        Setup.build(P, F, None, placement=Here())


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
def test_module_forward_equals_the_donor_module_and_p_own(model_type):
    """Linear and GPT-2 Conv1D are computed directly; other modules run with F's parameters
    swapped in. Each equals F's own module on the same input, and P's own without parameters."""
    P, F, _, _ = setup(model_type)
    adapter = adapter_for(P)
    paths = [s.path for c in ("q", "down", "ln_attn") for s in adapter.sites(c, 0, P.config)]
    for path in dict.fromkeys(paths):
        mine, theirs = P.get_submodule(path), F.get_submodule(path)
        x = torch.randn(2, 3, next(mine.parameters()).shape[-1 if "ln" in path else 0 if model_type == "gpt2" else -1])
        params = dict(theirs.named_parameters())
        with torch.no_grad():
            got = module_forward(mine, mine, params, x)
            torch.testing.assert_close(got, theirs(x), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(module_forward(mine, mine, None, x), mine(x), atol=1e-6, rtol=1e-6)


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


# -- replacement, not addition: who computes which cell ----------------------------------------


def rows_by_weights(linear: torch.nn.Linear, run) -> dict[str, int]:
    """Rows (token positions) ``linear`` processed during ``run()``, split by whose weight it had:
    P's own, or a donor's swapped in."""
    own = linear.weight.data_ptr()
    seen = {"P": 0, "donor": 0}

    def count(module, args):
        seen["P" if module.weight.data_ptr() == own else "donor"] += args[0].shape[:-1].numel()

    handle = linear.register_forward_pre_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_grafted_cells_are_not_computed_by_p():
    P, _, _, g = setup("llama")
    down = P.model.layers[1].mlp.down_proj
    batch = pad_left([t.ids for t in g.tokenize(PROMPTS)], 0)
    cells = int(batch.attention_mask.numel())
    last = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[1], positions=[Last()])])
    seen = rows_by_weights(down, lambda: g.run(last, PROMPTS))
    assert seen == {"P": cells - len(PROMPTS), "donor": len(PROMPTS)}
    # every position of one prompt: P's MLP does not run at all
    everywhere = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[1], positions=[All()])])
    n = len(g.tokenize(PROMPTS[:1])[0])
    assert rows_by_weights(down, lambda: g.run(everywhere, PROMPTS[:1])) == {"P": 0, "donor": n}
    # and without a graft, P computes every cell (the counter sees P's calls)
    assert rows_by_weights(down, lambda: g.run(GraftSpec(), PROMPTS)) == {"P": cells, "donor": 0}


def matmul_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("model_type, components", [
    ("llama", ["mlp"]), ("llama", ["q", "k", "v", "o"]), ("llama", ["lm_head"]),
    ("gpt2", ["q"]), ("gpt2", ["k", "v", "down"]), ("gpt_neox", ["v"]), ("gpt_neox", ["q", "k", "v", "up"]),
])
def test_a_graft_costs_the_matmul_flops_of_a_plain_forward(model_type, components):
    _, _, _, g = setup(model_type)
    spec = GraftSpec(rules=[GraftRule(components=components, positions=[Span(span="first_actor"), Last()])])
    g.run(GraftSpec(), PROMPTS[:1])  # the first run also runs the identity guard's extra pass: not counted
    plain = matmul_flops(lambda: g.run(GraftSpec(), PROMPTS, SPANS))
    grafted = matmul_flops(lambda: g.run(spec, PROMPTS, SPANS))
    assert plain > 0
    assert grafted == plain
    # the graft did happen
    assert not torch.allclose(g.run(spec, PROMPTS, SPANS).logits, g.run(GraftSpec(), PROMPTS, SPANS).logits)


def projection_with_graft(module_p, module_f, x, rows, cols):
    """What a graft of ``module_f`` at (rows, cols) must give: P's output with those cells F's."""
    want = module_p(x).detach().clone()
    want[rows, cols] = module_f(x).detach()[rows, cols]
    return want


@pytest.mark.parametrize("grad", [False, True])
def test_each_cell_of_a_projection_is_computed_with_its_own_weights(grad):
    """Grouped computation (with autograd off: into a scratch buffer; on: per group, and the
    gradient reaches the input) equals P's projection with F's at the grafted cells."""
    torch.manual_seed(0)
    mine, theirs = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    x = torch.randn(3, 4, 6, requires_grad=grad)
    rows, cols = torch.tensor([0, 2, 2]), torch.tensor([1, 0, 3])
    graft = ModuleGraft("q", ("q",), 0, rows, cols)
    with torch.set_grad_enabled(grad):
        got = replaced_output(SimpleNamespace(_module=mine), x, [graft], [dict(theirs.named_parameters())])
    torch.testing.assert_close(got, projection_with_graft(mine, theirs, x, rows, cols))
    if grad:
        got.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_shared_gathers_and_scratch_buffers_never_serve_stale_rows():
    """One pass's modules share gathered inputs (same tensor, same cells) and scratch buffers:
    a second input of the same shape, and the same input changed in place, are gathered anew."""
    torch.manual_seed(0)
    mine = [torch.nn.Linear(6, 6) for _ in range(3)]
    theirs = [torch.nn.Linear(6, 6) for _ in range(3)]
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3])
    graft = ModuleGraft("q", ("q",), 0, rows, cols)
    layouts = Layouts()
    first, second = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    with torch.no_grad():
        for x in (first, first, second, first):
            for m, f in zip(mine, theirs):
                got = replaced_output(SimpleNamespace(_module=m), x, [graft], [dict(f.named_parameters())], layouts)
                torch.testing.assert_close(got, projection_with_graft(m, f, x, rows, cols))
        first.mul_(-2)  # in place: same tensor, new version
        got = replaced_output(SimpleNamespace(_module=mine[0]), first, [graft], [dict(theirs[0].named_parameters())],
                              layouts)
        torch.testing.assert_close(got, projection_with_graft(mine[0], theirs[0], first, rows, cols))


def test_scratch_kept_from_pass_to_pass_serves_batches_of_any_size():
    """A backend keeps one Scratch for all its passes: a smaller batch after a larger one uses
    part of the grown buffers, a larger one grows them; every result stays exact."""
    torch.manual_seed(0)
    mine, theirs = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    scratch = Scratch()
    with torch.no_grad():
        for batch in (3, 1, 5, 2):
            x = torch.randn(batch, 4, 6)
            rows, cols = torch.arange(batch), torch.full((batch,), 2)
            graft = ModuleGraft("q", ("q",), 0, rows, cols)
            got = replaced_output(SimpleNamespace(_module=mine), x, [graft], [dict(theirs.named_parameters())],
                                  Layouts(scratch))
            torch.testing.assert_close(got, projection_with_graft(mine, theirs, x, rows, cols))


def test_feature_graft_of_a_module_that_is_not_a_projection_is_refused():
    P, _, _, g = setup("llama")
    batch = pad_left([t.ids for t in g.tokenize(PROMPTS[:1])], 0)
    graft = ModuleGraft("model.layers.0.mlp", ("mlp",), 0, torch.tensor([0]), torch.tensor([1]),
                        features=torch.tensor([0, 1]))
    plan = GraftPlan([graft], 1, batch.input_ids.shape[1])
    with pytest.raises(UnsupportedArchitectureError, match="cannot graft output features of a LlamaMLP module"):
        g.forward(plan, batch)


def test_the_setup_resolves_derived_donors_once_for_either_placement():
    """A rule's "weights" selection derives a partial donor: built on first use by the set-up (the
    one place for both backends), then the same object for every later plan."""
    from nngraft.backends.ndif import NdifBackend
    from nngraft.backends.payload import RemotePartialDonor
    from nngraft.backends.setup import Elsewhere
    from nngraft.donors.delta import DeltaDonor
    from nngraft.donors.partial import PartialDonor

    P, F, tok, g = setup("llama")
    spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()], weights={"top_percent": 10})])
    plan = g.plan(spec, PROMPTS, SPANS)
    first, again = g.setup.donors_for(plan), g.setup.donors_for(g.plan(spec, PROMPTS[:1], SPANS[:1]))
    [name] = plan.derived
    assert type(first[name]) is PartialDonor and again[name] is first[name] and first["default"] is g.donor
    placement = NdifBackend(execution="local", verbose=False).placement(P)
    assert placement == Elsewhere(hosted=False)
    remote = Setup.build(P, DeltaDonor(F, P), tok, placement=placement)
    assert type(remote.donors_for(plan)[name]) is RemotePartialDonor
    with pytest.raises(DonorMismatchError, match="this run has donors \\['default'\\]"):
        remote.donors_for(g.plan(GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()], donor="h",
                                                            weights={"top_percent": 10})]), PROMPTS, SPANS))
