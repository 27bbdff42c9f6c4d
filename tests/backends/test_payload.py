"""nngraft.backends.payload and nngraft.backends.functional: which functional formula computes
each module (bit for bit), plans split into leaf modules, and payload sizes from shapes alone
(also through ``nngraft payload``)."""

from __future__ import annotations

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last
from nngraft.backends.payload import (
    PayloadReport,
    ShapeDonor,
    estimate_payload,
    format_bytes,
    leaf_plan,
    module_kind,
    spec_modules,
)
from nngraft.donors.delta import LoraDonor
from nngraft.errors import PayloadTooLargeError, UnsupportedModuleError
from nngraft.testing import TINY_MODEL_TYPES, tiny_pair

from tests.helpers.ndif import PROMPTS, SPEC, models


def _leaf_modules(arch: str):
    from nngraft.arch import adapter_for, get_module
    from nngraft.backends.ndif import spec_modules

    P, F, tok = tiny_pair(arch)
    adapter = adapter_for(P)
    spec = GraftSpec(rules=[GraftRule(components=["everything"], positions=[Last()])])
    for path, _, _ in spec_modules([spec], adapter, P.config):
        yield P, path, get_module(P, path)


@pytest.mark.parametrize("arch", TINY_MODEL_TYPES)
def test_functional_forms_reproduce_every_module(arch):
    from nngraft.backends.functional import forward

    seen = set()
    for P, path, module in _leaf_modules(arch):
        kind, const = module_kind(module, path)
        seen.add(kind)
        if kind == "embedding":
            x = torch.tensor([[3, 4, 5]])
        else:
            width = module.weight.shape[-1] if kind != "conv1d" else module.weight.shape[0]
            x = torch.randn(2, 3, width)
        with torch.no_grad():
            expected = module(x)
            got = forward(kind, x, dict(module.named_parameters()), const)
        assert torch.equal(got, expected), (arch, path, kind)
    assert "embedding" in seen and ({"linear", "conv1d"} & seen)


def test_unknown_module_class_is_refused():
    class ScaledNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight * 2

    with pytest.raises(UnsupportedModuleError, match="ScaledNorm"):
        module_kind(ScaledNorm(), "model.norm")


def test_leaf_plan_splits_a_whole_mlp_graft():
    from nngraft.arch import adapter_for

    P, F, tok, _, _ = models("llama")
    plan = Grafter(P, F, tok).plan(GraftSpec(rules=[GraftRule(components=["mlp"], layers="last:1",
                                                              positions=[Last()])]), PROMPTS[:1])
    assert [m.path for m in plan.modules] == ["model.layers.1.mlp"]
    leaves = leaf_plan(plan, adapter_for(P), P.config)
    assert [m.path for m in leaves.modules] == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_estimate_payload_from_shapes_on_meta_model():
    """The pre-flight estimate needs no weights: a meta model built from the config suffices."""
    from transformers import AutoModelForCausalLM

    P, F, tok, lora_dir, _ = models("llama")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(P.config)
    real = estimate_payload([SPEC], P, LoraDonor(lora_dir), torch.bfloat16)
    shapes = estimate_payload([SPEC], meta, LoraDonor(lora_dir), torch.bfloat16)
    assert real.total_bytes == shapes.total_bytes > 0


def test_payload_command(tmp_path, capsys):
    from nngraft.cli import main
    from nngraft.testing import tiny_config

    tiny_config("llama").save_pretrained(tmp_path / "cfg")
    spec_file = tmp_path / "lt_mlp.json"
    GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])]).save(spec_file)
    lora_dir = models("llama")[3]
    rc = main(["payload", str(spec_file), "--model", str(tmp_path / "cfg"), "--per-module",
               "--donor", "dense", "--donor", "lora:2:up_proj", "--donor", f"adapter:{lora_dir}"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "12.3 kB" in text  # dense: 3 matrices of 64×32 in bfloat16
    assert "384 B" in text  # LoRA r=2 on up_proj only: 2·(64+32) numbers
    assert "2.3 kB" in text  # the real adapter (r=4 on gate/up/down): 3·4·(64+32) numbers
    assert main(["payload", str(spec_file), "--model", str(tmp_path / "cfg"), "--donor", "lora"]) == 2


def test_format_bytes_and_shape_donors():
    assert [format_bytes(n) for n in (384, 2_304, 12_288, 7_077_888)] == ["384 B", "2.3 kB", "12.3 kB", "7.1 MB"]
    assert ShapeDonor.parse("lora:16").describe() == ShapeDonor("lora", 16).describe()
    P, _, _ = tiny_pair("llama")
    spec = GraftSpec(rules=[GraftRule(components=["up"], layers="last:1", positions=[Last()])])
    dense = estimate_payload([spec], P, ShapeDonor.parse("dense"), torch.bfloat16)
    lora = estimate_payload([spec], P, ShapeDonor.parse("lora:2"), torch.bfloat16)
    assert dense.total_bytes == 64 * 32 * 2  # up_proj: 64×32 in bfloat16
    assert lora.total_bytes == 2 * (64 + 32) * 2  # two rank-2 factors


def test_report_over_the_limit_is_refused_with_the_sizes():
    report = PayloadReport(donor="dense", dtype="bfloat16", limit_bytes=1_000)
    report.check(size=999)
    with pytest.raises(PayloadTooLargeError, match=r"2\.0 kB.*1\.0 kB"):
        report.check(size=2_000)
