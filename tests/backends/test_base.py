"""nngraft.backends.base: the Backend contract, and a custom backend written on the contract before
0.2 (``attach`` loaded P and the donors, ``forward(plan, batch)`` ran a pass), which keeps working
for one release with a DeprecationWarning (nngraft.deprecated.adapt_old_backend)."""

from __future__ import annotations

import warnings

import pytest
import torch
from nnsight import NNsight

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.backends.base import Backend
from nngraft.backends.local import LocalBackend, apply_plan
from nngraft.donors.donor import as_donor
from nngraft.testing import tiny_pair

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
SPEC = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")]),
                                      GraftRule(components=["mlp"], positions=[Last()])])


def old_style_backend_class() -> type:
    """A custom backend as users wrote them before 0.2: it loads in ``attach`` and runs in ``forward``."""

    class OldStyle(Backend):  # the class statement the warning points at
        def attach(self, recipient, donor, tokenizer, *, adapter, donors, dtype, device):
            self.model, self.tokenizer, self.adapter = recipient, tokenizer, adapter
            self.donors = {"default": as_donor(donor), **{k: as_donor(v) for k, v in donors.items()}}
            self.envoy = NNsight(recipient)
            self.attached = (recipient, donor, tokenizer, dict(donors), dtype)
            self.passes = 0

        def forward(self, plan, batch, *, keep_all=False, cache=None, use_cache=False):
            self.passes += 1
            with torch.no_grad(), self.envoy.trace(**batch.model_inputs(), use_cache=False):
                apply_plan(self.envoy, plan, self.donors)
                out = self.envoy.output.save()
            return out.logits, None

    return OldStyle


def test_an_old_style_backend_warns_where_it_is_defined():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_style_backend_class()
    [warning] = [w for w in caught if w.category is DeprecationWarning]
    assert warning.filename == __file__
    assert "OldStyle implements the Backend contract before 0.2 (attach(recipient, donor, tokenizer, ...) and " \
           "forward(plan, batch, ...)), which is deprecated" in str(warning.message)
    assert "__call__(setup, plan, batch, *, keep_all, cache, use_cache)" in str(warning.message)


def test_an_old_style_backend_gives_the_local_logits():
    """The shim hands ``attach`` what the Grafter's set-up resolved and calls ``forward`` for every
    pass: the grafted logits equal the local backend's (run and run_grid), and differ from P's."""
    P, F, tok = tiny_pair("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        OldStyle = old_style_backend_class()
    old = OldStyle()
    g_old = Grafter(P, F, tok, backend=old)
    recipient, donor, tokenizer, named, dtype = old.attached
    assert recipient is P and tokenizer is tok and named == {} and dtype == torch.float32
    assert donor is g_old.setup.donors["default"]
    g_local = Grafter(P, F, tok, backend=LocalBackend())
    got = g_old.run(SPEC, PROMPTS, SPANS).logits
    want = g_local.run(SPEC, PROMPTS, SPANS).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and old.passes >= 1
    plain = g_local.run(GraftSpec(name="p"), PROMPTS, SPANS).logits
    assert (got - plain).abs().max() > 1e-3  # the graft did something
    p_spec = GraftSpec(name="p")
    grid_old = g_old.run_grid([SPEC, p_spec], PROMPTS, SPANS)
    grid_local = g_local.run_grid([SPEC, p_spec], PROMPTS, SPANS)
    for name in ("fe_lt", "p"):
        assert torch.allclose(grid_old[name].logits, grid_local[name].logits, atol=1e-6, rtol=0)


def test_a_backend_on_the_current_contract_gets_no_warning_and_no_shim():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)

        class Counting(LocalBackend):
            def __call__(self, setup, plan, batch, **kwargs):
                return super().__call__(setup, plan, batch, **kwargs)

    assert Counting.prepare is Backend.prepare
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (Backend,), {"forward": lambda self, plan, batch: None})()  # forward alone: no shim
