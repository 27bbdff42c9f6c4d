"""The one table of module kinds (nngraft.arch.kinds): each module is the kind its class says; the
table's facts (weight orientation, output-feature axes, FLOPs, the server's formula names) match
what the modules and nngraft.backends.functional actually do."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from nngraft.arch import ADAPTERS
from nngraft.arch.kinds import CONV1D, EMBEDDING, FUNCTIONAL_FORMS, KINDS, LINEAR, NORM, direct, feature_axes, kind_of
from nngraft.backends import functional
from nngraft.errors import UnsupportedArchitectureError
from nngraft.testing import tiny_model


class OwnForward(torch.nn.Linear):
    def forward(self, x):  # noqa: D102 - not the Linear formula
        return super().forward(x) * 2


@pytest.mark.parametrize(("module", "kind"), [
    (torch.nn.Linear(4, 3), LINEAR), (Conv1D(3, 4), CONV1D), (torch.nn.Embedding(10, 4), EMBEDDING),
    (torch.nn.LayerNorm(4), NORM), (OwnForward(4, 3), LINEAR), (torch.nn.GELU(), None),
])
def test_each_module_is_the_kind_its_class_says(module, kind):
    assert kind_of(module) is kind


def test_only_a_module_whose_forward_is_its_formula_is_computed_directly():
    assert direct(torch.nn.Linear(4, 3)) is LINEAR and direct(Conv1D(3, 4)) is CONV1D
    assert direct(OwnForward(4, 3)) is None and direct(torch.nn.Embedding(10, 4)) is None


@pytest.mark.parametrize("module", [torch.nn.Linear(4, 3), Conv1D(3, 4)], ids=["linear", "conv1d"])
def test_the_feature_axes_index_the_output_features(module):
    """Zeroing output feature 1 along the table's axes zeroes exactly output column 1."""
    x = torch.randn(5, 4)
    axes = feature_axes(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.index_fill_(axes[name], torch.tensor([1]), 0.0)
        y = module(x)
    assert torch.all(y[:, 1] == 0) and torch.all(y[:, [0, 2]] != 0)
    assert kind_of(module).out_features(module) == 3


def test_features_of_an_embedding_or_norm_cannot_be_taken_apart():
    with pytest.raises(UnsupportedArchitectureError, match="feature grafts are defined for Linear and Conv1D"):
        feature_axes(torch.nn.Embedding(10, 4))


@pytest.mark.parametrize("module", [torch.nn.Linear(16, 8), Conv1D(8, 16), torch.nn.Embedding(10, 16),
                                    torch.nn.LayerNorm(16)], ids=["linear", "conv1d", "embedding", "norm"])
def test_matmul_flops_equal_torchs_count(module):
    tokens = 6
    x = torch.randint(0, 10, (tokens,)) if isinstance(module, torch.nn.Embedding) else torch.randn(tokens, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    assert kind_of(module).matmul_flops(module, tokens) == counter.get_total_flops()


def test_the_linear_map_of_a_stored_weight():
    for module in (torch.nn.Linear(4, 3), Conv1D(3, 4)):
        kind, x = kind_of(module), torch.randn(2, 4)
        matrix = kind.as_linear_map(module.weight.detach())
        assert matrix.shape == (3, 4) and torch.equal(kind.from_linear_map(matrix), module.weight.detach())
        torch.testing.assert_close(x @ matrix.t() + module.bias.detach(), module(x).detach())


def test_the_servers_formula_names_are_the_tables():
    assert set(functional.KINDS) == set(FUNCTIONAL_FORMS) and len(FUNCTIONAL_FORMS) == len(set(FUNCTIONAL_FORMS))
    assert set(KINDS) == {"linear", "conv1d", "embedding", "norm"}


def test_every_graftable_module_of_every_tiny_model_has_a_kind():
    """The adapters' component modules (leaf projections, embeddings, norms) are all in the table;
    whole MLPs run as themselves."""
    for model_type in ("gpt2", "llama", "gemma2", "gpt_neox"):
        model, adapter = tiny_model(model_type), ADAPTERS[model_type]
        for component in adapter.components:
            for layer in ([None] if component in ("embed", "ln_final", "lm_head") else [0]):
                for site in adapter.sites(component, layer, model.config):
                    module = model.get_submodule(site.path)
                    if component != "mlp":
                        assert kind_of(module) is not None, (model_type, site.path)


def test_only_the_adapter_knows_what_is_fused():
    assert ADAPTERS["gpt2"].fused_with("q") == ("q", "k", "v") and ADAPTERS["gpt_neox"].fused_with("v")
    assert ADAPTERS["llama"].fused_with("q") == () and ADAPTERS["gpt2"].fused_with("mlp") == ()
