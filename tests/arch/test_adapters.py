"""The adapter table: every path exists, every weight is reachable, forward order is right,
unknown architectures get a helpful error, users can register their own."""

from __future__ import annotations

import pytest
import torch

from nngraft import (
    Adapter,
    ComponentNotFoundError,
    GraftRule,
    GraftSpec,
    Grafter,
    Last,
    UnsupportedArchitectureError,
    adapter_for,
    register_adapter,
)
from nngraft.arch import ADAPTERS, adapter_for_model_type, fused_features, get_module
from nngraft.testing import TINY_MODEL_TYPES, tiny_model, tiny_pair
from tests.helpers import ROOT


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_every_weight_belongs_to_a_component(model_type):
    model = tiny_model(model_type)
    assert adapter_for(model).uncovered_parameters(model) == []


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_block_order_is_forward_order(model_type):
    """nnsight needs modules touched in forward order: the adapter's order must match the
    order in which the forward pass actually calls the modules."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    prefix = f"{adapter.layers_path}.0."
    called: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=name: called.append(name))
             for name, m in model.named_modules() if name.startswith(prefix)]
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    for h in hooks:
        h.remove()
    ranks = [called.index(prefix + rel) for rel in adapter.block_order()]
    assert ranks == sorted(ranks), f"{model_type}: adapter order {list(adapter.block_order())} vs calls {called}"


def test_fused_features_layouts():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=6, num_attention_heads=3)
    assert fused_features("concat", "k", cfg) == (6, 7, 8, 9, 10, 11)
    # per head: [q0 q0 k0 k0 v0 v0 | q1 q1 k1 k1 v1 v1 | ...]
    assert fused_features("per_head", "v", cfg) == (4, 5, 10, 11, 16, 17)
    all_feats = sorted(sum((fused_features("per_head", c, cfg) for c in "qkv"), ()))
    assert all_feats == list(range(18))


def test_unknown_architecture_names_what_to_register():
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for_model_type("my_arch")
    message = str(info.value)
    assert "my_arch" in message and "register_adapter" in message and "gpt2" in message


def test_missing_component_is_named():
    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    spec = GraftSpec(name="gates", rules=[GraftRule(components=["gate"], positions=[Last()])])
    with pytest.raises(ComponentNotFoundError, match=r"rules\[0\]: component 'gate' does not exist in 'gpt2'.*'up' and 'down'"):
        g.run(spec, ["Ada Lovelace stars in"])
    llama = adapter_for(tiny_model("llama"))
    with pytest.raises(ComponentNotFoundError, match="pos_embed.*rotary"):
        llama.expand(["pos_embed"])
    # groups keep what exists: 'mlp' on GPT-2 is up + down
    assert adapter_for(P).expand(["mlp"]) == (["up", "down"], [])


def test_register_a_custom_adapter():
    """A user-registered adapter under a new model_type drives grafting with no library edits."""
    P, F, tok = tiny_pair("llama")
    P.config.model_type = F.config.model_type = "my_llama"
    custom = Adapter("my_llama", "model.layers", (("up", "mlp.up_proj"), ("down", "mlp.down_proj")),
                     embed="model.embed_tokens", lm_head="lm_head")
    try:
        register_adapter(custom)
        with pytest.raises(ValueError, match="exists"):
            register_adapter(Adapter("my_llama", "model.layers", ()))
        g = Grafter(P, F, tok)
        assert g.adapter is custom
        assert "model.layers.0.self_attn.q_proj.weight" in custom.uncovered_parameters(P)
        spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        assert g.plan(spec, ["Ada stars in"]).modules[0].path == "model.layers.0.mlp"
    finally:
        ADAPTERS.pop("my_llama", None)


def test_adapter_with_wrong_path_is_refused():
    model = tiny_model("llama")
    bad = Adapter("llama", "model.layers", (("up", "mlp.w_up"),))
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.0.mlp.w_up"):
        bad.check_model(model)


def test_get_module():
    model = tiny_model("gpt2")
    assert get_module(model, "transformer.h.1.mlp.c_fc") is model.transformer.h[1].mlp.c_fc


def test_docs_table_is_current():
    from pathlib import Path

    from nngraft.arch import adapters_markdown

    doc = (ROOT / "docs" / "architectures.md").read_text()
    table = doc.split("<!-- adapters:start -->\n")[1].split("<!-- adapters:end -->")[0].strip()
    assert table == adapters_markdown(), "regenerate with nngraft.arch.adapters_markdown()"


def test_module_class_and_checkpoint_facts_come_from_the_table():
    from transformers.pytorch_utils import Conv1D

    from nngraft.arch import (CHECKPOINT_RENAMES, checkpoint_prefixes, output_axis, stores_weight_in_out,
                              tied_alternatives)

    conv, linear = Conv1D(6, 4), torch.nn.Linear(4, 6)
    assert stores_weight_in_out(conv) and not stores_weight_in_out(linear)
    assert output_axis(conv, "weight", conv.weight) == 1 and output_axis(conv, "bias", conv.bias) == 0
    assert output_axis(linear, "weight", linear.weight) == 0
    assert set(checkpoint_prefixes()) == {"model.", "transformer.", "gpt_neox."}
    assert set(tied_alternatives("lm_head.weight")) == {"model.embed_tokens.weight", "transformer.wte.weight",
                                                         "gpt_neox.embed_in.weight"}
    assert tied_alternatives("model.layers.0.mlp.up_proj.weight") == ()
    assert CHECKPOINT_RENAMES["lm_head.weight"] == ("embed_out.weight",)
    P, _, _ = tiny_pair("llama")
    assert adapter_for(P).head_dim(P.config) == P.config.head_dim
