"""Donors: a loaded model, a dict of tensors, or safetensors read lazily — same numbers; clear
errors on mismatched architectures, shapes and missing tensors; dtype is cast."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nngraft import DonorMismatchError, GraftRule, GraftSpec, Grafter, Last, SafetensorsDonor, TensorDonor
from nngraft.testing import tiny_model, tiny_pair

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Marie Curie stars in"]
SPEC = GraftSpec(rules=[GraftRule(components=["mlp", "o"], layers="last:1", positions=[Last()]),
                        GraftRule(components=["lm_head"], positions=[Last()])])


def _state(model):
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_safetensors_and_tensor_donors_equal_model_donor(tmp_path, model_type):
    P, F, tok = tiny_pair(model_type)
    expected = Grafter(P, F, tok).run(SPEC, PROMPTS).logits
    F.save_pretrained(tmp_path / "F")  # a standard HF checkpoint folder (tied weights saved once)
    lazy = Grafter(P, str(tmp_path / "F"), tok)
    assert isinstance(lazy.donor, SafetensorsDonor)
    torch.testing.assert_close(lazy.run(SPEC, PROMPTS).logits, expected, rtol=0, atol=0)
    # only what the spec needs was read
    assert set(lazy.donor._cache) == {m.path for m in lazy.plan(SPEC, PROMPTS).modules}
    tensors = Grafter(P, TensorDonor(dict(F.named_parameters())), tok)
    torch.testing.assert_close(tensors.run(SPEC, PROMPTS).logits, expected, rtol=0, atol=0)


def test_checkpoint_without_model_prefix(tmp_path):
    """GPT-2 checkpoints on the Hub name tensors 'h.0.mlp...' without 'transformer.'."""
    P, F, tok = tiny_pair("gpt2")
    state = {k.removeprefix("transformer."): v for k, v in _state(F).items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    expected = Grafter(P, F, tok).run(SPEC, PROMPTS).logits
    torch.testing.assert_close(Grafter(P, str(tmp_path / "model.safetensors"), tok).run(SPEC, PROMPTS).logits,
                               expected, rtol=0, atol=0)


def test_missing_tensor_is_named(tmp_path):
    P, F, tok = tiny_pair("llama")
    state = {k: v for k, v in _state(F).items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, tmp_path / "partial.safetensors")
    g = Grafter(P, str(tmp_path / "partial.safetensors"), tok)
    with pytest.raises(DonorMismatchError, match=r"partial.safetensors has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        g.run(SPEC, PROMPTS)
    before = {n: p.clone() for n, p in P.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in P.named_parameters())  # P untouched by the failure


def test_architecture_and_shape_mismatch():
    P, _, tok = tiny_pair("llama")
    with pytest.raises(DonorMismatchError, match="recipient is a 'llama' model but the donor is 'gpt2'"):
        Grafter(P, tiny_model("gpt2", vocab_size=len(tok)), tok)
    bigger = tiny_model("llama", n_layers=3, vocab_size=len(tok))
    with pytest.raises(DonorMismatchError, match="the recipient has depth num_hidden_layers=3 but the donor has "
                                                 "num_hidden_layers=2"):
        Grafter(bigger, P, tok)
    wrong = {"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}
    g = Grafter(P, TensorDonor(wrong, source="my dict"), tok)
    spec = GraftSpec(rules=[GraftRule(components=["up"], layers=[1], positions=[Last()])])
    with pytest.raises(DonorMismatchError, match=r"shape \(3, 3\) but the recipient's has \(64, 32\)"):
        g.run(spec, PROMPTS)
    with pytest.raises(DonorMismatchError, match=r"my dict\) has no tensor 'model.layers.1.mlp.gate_proj.weight'"):
        g.run(GraftSpec(rules=[GraftRule(components=["gate"], layers=[1], positions=[Last()])]), PROMPTS)


def test_half_precision_donor_is_cast_to_recipient_dtype():
    P, F, tok = tiny_pair("llama")
    halves = {k: v.to(torch.bfloat16) for k, v in F.named_parameters()}
    rounded = {k: v.float() for k, v in halves.items()}
    a = Grafter(P, TensorDonor(halves), tok).run(SPEC, PROMPTS).logits
    b = Grafter(P, TensorDonor(rounded), tok).run(SPEC, PROMPTS).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(DonorMismatchError, match="non-float dtype"):
        Grafter(P, TensorDonor({k: v.long() for k, v in F.named_parameters()}), tok).run(SPEC, PROMPTS)
