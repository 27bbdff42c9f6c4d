"""Donors that travel as data (nngraft.donors.delta): locally they give the numbers of the module-based
donor they stand for; remotely (here: the in-process server round trip) the same numbers again;
and every rank-truncated tensor's reported error is the true one."""

from __future__ import annotations

import copy
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.donors.delta import DeltaDonor, DenseDonor, LoraDonor, RemoteDonorError, from_map, layout_of, to_map
from nngraft.errors import DonorMismatchError
from nngraft.testing import perturbed_copy, tiny_pair

ATOL, RTOL = 2e-5, 1e-4
PROMPTS = ["Ada Lovelace stars in a movie alongside", "Q: Who stars in a movie with Grace Hopper? A:"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
SPEC = GraftSpec(name="everything", rules=[
    GraftRule(components=["everything"], positions=[Span(span="first_actor"), Last()])])


def run(P, donor, tok, *, remote=False):
    if remote:
        return Grafter.remote(P, donor, tok, execution="local", verbose=False).run(SPEC, PROMPTS, SPANS).logits
    return Grafter(P, donor, tok).run(SPEC, PROMPTS, SPANS).logits


@lru_cache(maxsize=None)
def reference(arch: str) -> torch.Tensor:
    P, F, tok = tiny_pair(arch)
    return Grafter(P, F, tok).run(SPEC, PROMPTS, SPANS).logits


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def lora_adapter(P, folder: Path, **config):
    """Save a PEFT LoRA adapter (random A and B) for ``P``; return (folder, merged model)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(P), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(folder)
    return folder, model.merge_and_unload().eval()


# ---------------------------------------------------------------------------------------------
# Dense and delta
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_donor_is_the_model_donor(arch):
    P, F, tok = tiny_pair(arch)
    assert torch.equal(run(P, DenseDonor(F), tok), reference(arch))
    assert torch.equal(run(P, DenseDonor(F.state_dict()), tok), reference(arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_delta_equals_model_donor_locally_and_remotely(arch):
    P, F, tok = tiny_pair(arch)
    close(run(P, DeltaDonor(F, P), tok), reference(arch))
    close(run(P, DeltaDonor(F, P), tok, remote=True), reference(arch))
    pretrained = P.state_dict()
    deltas = {n: f - pretrained[n] for n, f in F.state_dict().items()}
    close(run(P, DeltaDonor(deltas=deltas), tok), reference(arch))


def test_delta_from_checkpoints(tmp_path):
    P, F, tok = tiny_pair("llama")
    F.save_pretrained(tmp_path / "F")
    P.save_pretrained(tmp_path / "P")
    close(run(P, DeltaDonor(tmp_path / "F", tmp_path / "P"), tok), reference("llama"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_r_delta_gives_the_same_numbers_locally_and_remotely(arch):
    P, F, tok = tiny_pair(arch)
    local = run(P, DeltaDonor(F, P, rank=2), tok)
    remote = run(P, DeltaDonor(F, P, rank=2), tok, remote=True)
    close(remote, local)
    # truncation matters, and more rank gets closer to F
    err2 = (local - reference(arch)).abs().max()
    err8 = (run(P, DeltaDonor(F, P, rank=8), tok) - reference(arch)).abs().max()
    assert err2 > 1e-3 and err8 < err2


def test_reported_error_is_the_true_reconstruction_error():
    P, F, tok = tiny_pair("llama")
    donor = DeltaDonor(F, P, rank=3, dtype=torch.float32)
    path, module = "model.layers.1.mlp.down_proj", P.model.layers[1].mlp.down_proj
    shipment = donor.shipment(path, module)
    [row] = [r for r in donor.report() if r["name"] == f"{path}.weight"]
    dw = (F.model.layers[1].mlp.down_proj.weight - module.weight).detach()
    sigma = torch.linalg.svdvals(dw)
    from_sigma = math.sqrt(float((sigma[3:] ** 2).sum())) / float(dw.norm())
    explicit = float((dw - shipment.tensors["weight.B"] @ shipment.tensors["weight.A"]).norm() / dw.norm())
    assert row["rank"] == 3 and row["shape"] == (32, 64)
    assert row["rel_error"] == pytest.approx(from_sigma, rel=1e-4)
    assert row["rel_error"] == pytest.approx(explicit, rel=1e-4)
    weight = float(F.model.layers[1].mlp.down_proj.weight.detach().norm())
    assert row["rel_to_weight"] == pytest.approx(explicit * float(dw.norm()) / weight, rel=1e-4)
    assert row["bytes"] == 3 * (32 + 64) * 4 and row["dense_bytes"] == 32 * 64 * 4


def test_report_includes_dtype_rounding():
    P, F, tok = tiny_pair("llama")
    donor = DeltaDonor(F, P, dtype=torch.bfloat16)  # dense: the only error is bf16 rounding
    donor.shipment("model.layers.0.mlp.up_proj", P.model.layers[0].mlp.up_proj)
    [row] = donor.report()
    assert row["rank"] == "dense" and row["dtype"] == "bfloat16"
    assert 1e-4 < row["rel_error"] < 1e-2  # bf16 keeps ~8 bits of mantissa


def test_a_rank_that_saves_nothing_is_sent_dense():
    P, F, tok = tiny_pair("llama")
    donor = DeltaDonor(F, P, rank=32, dtype=torch.float32)  # 32·(64+32) > 64·32
    shipment = donor.shipment("model.layers.0.mlp.up_proj", P.model.layers[0].mlp.up_proj)
    assert set(shipment.tensors) == {"weight"} and donor.report()[0]["rank"] == "dense"
    assert donor.report()[0]["rel_error"] == 0.0


def test_unchanged_modules_are_skipped():
    P, _, tok = tiny_pair("llama")
    F = perturbed_copy(P, only=("mlp",))  # a finetune that only touched the MLPs
    g = Grafter.remote(P, DeltaDonor(F, P), tok, execution="local", verbose=False)
    out = g.run(SPEC, PROMPTS, SPANS).logits
    close(out, Grafter(P, F, tok).run(SPEC, PROMPTS, SPANS).logits)
    sent = {i.path for i in g.backend.last_report.items if i.mode != "skip"}
    assert sent and all(".mlp." in p for p in sent)
    assert "model.layers.0.self_attn.q_proj" in g.backend.last_report.skipped


@pytest.mark.parametrize("make", ["dense", "delta", "rank4"])
def test_shipment_dtype_and_estimate(make):
    P, F, tok = tiny_pair("gpt2")
    donor = {"dense": DenseDonor(F), "delta": DeltaDonor(F, P), "rank4": DeltaDonor(F, P, rank=4)}[make]
    for path, module in (("transformer.h.0.attn.c_attn", P.transformer.h[0].attn.c_attn),
                         ("transformer.wte", P.transformer.wte), ("transformer.h.1.ln_2", P.transformer.h[1].ln_2)):
        shipment = donor.shipment(path, module, torch.bfloat16)
        assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in shipment.tensors.values())
        assert shipment.nbytes == donor.estimate_bytes(path, module, torch.bfloat16) > 0


def test_layouts_read_every_weight_as_a_linear_map():
    P, _, _ = tiny_pair("gpt2")
    x = torch.randn(3, 32)
    for module in (P.transformer.h[0].mlp.c_fc, P.lm_head):
        m = to_map(module.weight, layout_of(module))
        torch.testing.assert_close(module(x) - (module.bias if hasattr(module, "bias") and module.bias is not None else 0),
                                   x @ m.t())
        assert torch.equal(from_map(m, layout_of(module)), module.weight)
    assert layout_of(P.transformer.wte) == "embedding" and layout_of(P.transformer.ln_f) == "vector"


def test_envoys_are_not_donors():
    import nnsight

    P, F, _ = tiny_pair("llama")
    for make in (lambda e: DenseDonor(e), lambda e: DeltaDonor(e, P), lambda e: DeltaDonor(F, e)):
        with pytest.raises(RemoteDonorError, match="silently do nothing"):
            make(nnsight.NNsight(F))


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,targets,extra", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True, "use_rslora": True}),
    # mistral: untied embeddings (with tied ones, PEFT's merge also changes the output head, which
    # the unmerged adapter does not; the donor follows the adapter)
    ("mistral", ["q_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
     {"rank_pattern": {"up_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
])
def test_lora_donor_equals_the_merged_peft_model(tmp_path, arch, targets, extra):
    P, _, tok = tiny_pair(arch)
    folder, merged = lora_adapter(P, tmp_path / "a", r=4, lora_alpha=12, target_modules=targets, **extra)
    expected = Grafter(P, merged, tok).run(SPEC, PROMPTS, SPANS).logits
    plain = Grafter(P, P, tok).run(SPEC, PROMPTS, SPANS).logits
    assert (expected - plain).abs().max() > 1e-2
    close(run(P, LoraDonor(folder), tok), expected)
    close(run(P, LoraDonor(folder, dtype=torch.float32), tok, remote=True), expected)


def test_lora_scale_follows_the_config(tmp_path):
    P, _, tok = tiny_pair("llama")
    folder, _ = lora_adapter(P, tmp_path / "a", r=4, lora_alpha=12, target_modules=["up_proj", "down_proj"],
                             rank_pattern={"up_proj": 2}, alpha_pattern={"down_proj": 3})
    donor = LoraDonor(folder)
    assert donor.scale("model.layers.0.mlp.up_proj") == pytest.approx(12 / 2)
    assert donor.scale("model.layers.0.mlp.down_proj") == pytest.approx(3 / 4)
    rs, _ = lora_adapter(P, tmp_path / "b", r=4, lora_alpha=12, target_modules=["up_proj"], use_rslora=True)
    assert LoraDonor(rs).scale("model.layers.1.mlp.up_proj") == pytest.approx(12 / 2)  # alpha / sqrt(r)
    shipment = donor.shipment("model.layers.0.self_attn.q_proj", P.model.layers[0].self_attn.q_proj)
    assert shipment.mode == "skip"  # not adapted: F equals P there


def test_lora_modules_to_save_travel_dense(tmp_path):
    P, _, tok = tiny_pair("mistral")  # untied embeddings
    folder, merged = lora_adapter(P, tmp_path / "a", r=4, lora_alpha=8, target_modules=["v_proj"],
                                  modules_to_save=["lm_head"])
    with torch.no_grad():  # make the saved lm_head differ from P's
        merged.lm_head.weight.add_(0.05)
    import safetensors.torch as st

    weights = st.load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in weights if "lm_head" in k)
    weights[key] = merged.lm_head.weight.detach().clone()
    st.save_file(weights, str(folder / "adapter_model.safetensors"))
    donor = LoraDonor(folder)
    assert donor.shipment("lm_head", P.lm_head).mode == "replace"
    expected = Grafter(P, merged, tok).run(SPEC, PROMPTS, SPANS).logits
    close(run(P, donor, tok), expected)
    close(run(P, LoraDonor(folder, dtype=torch.float32), tok, remote=True), expected)


def test_unsupported_adapters_are_refused(tmp_path):
    P, _, _ = tiny_pair("llama")
    folder, _ = lora_adapter(P, tmp_path / "a", r=4, lora_alpha=8, target_modules=["up_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "DoRA"), ({"bias": "all"}, "trained biases"),
                            ({"peft_type": "IA3"}, "not LoRA")):
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(RemoteDonorError, match=message):
            LoraDonor(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(RemoteDonorError, match="has adapter_model.bin but no adapter_model.safetensors. "
                                               "nngraft never unpickles weights"):
        LoraDonor(folder)
    with pytest.raises(RemoteDonorError, match="adapter_config.json is not a .safetensors file: pass the adapter folder"):
        LoraDonor(folder / "adapter_config.json")
    with pytest.raises(RemoteDonorError, match="no LoRA adapter at .*nope: it does not exist"):
        LoraDonor(tmp_path / "nope")


class _Armed:
    """Unpickling this creates ``marker`` (as in tests/test_safety.py): a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickled_adapter_file_is_refused_unread_with_the_conversion(tmp_path, suffix):
    P, _, _ = tiny_pair("llama")
    folder, _ = lora_adapter(P, tmp_path / "a", r=4, lora_alpha=8, target_modules=["up_proj"])
    marker = tmp_path / "UNPICKLED"
    armed = folder / f"adapter_model{suffix}"
    torch.save({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": _Armed(marker)}, armed)
    with pytest.raises(RemoteDonorError) as error:
        LoraDonor(armed)
    message = str(error.value)
    assert message.startswith(f"{armed} is a pickled checkpoint. nngraft never unpickles weights (.bin, .pt, "
                              ".pth, .ckpt, .pkl, .pickle files are pickles; loading one can run code). "
                              "Convert the adapter to safetensors once")
    assert (f"python -c \"import torch, safetensors.torch as st; st.save_file(torch.load({str(armed)!r}, "
            f"weights_only=True), {str(folder / 'adapter_model.safetensors')!r})\"") in message
    assert f"Then pass the folder ({folder}) or the .safetensors file." in message
    assert "save_pretrained(DIR, safe_serialization=True)" in message
    assert not marker.exists()  # refused before anything read it
    torch.load(armed, weights_only=False)  # ... and the trap is live
    assert marker.exists()


def test_pickled_peft_adapter_converted_with_the_messages_command_gives_the_merged_numbers(tmp_path):
    import subprocess
    import sys

    P, _, tok = tiny_pair("llama")
    folder, merged = lora_adapter(P, tmp_path / "a", r=4, lora_alpha=8, target_modules=["up_proj", "v_proj"])
    from peft import PeftModel

    # the same adapter as PEFT's pickle format (safe_serialization=False writes adapter_model.bin)
    pickled = tmp_path / "pickled"
    PeftModel.from_pretrained(copy.deepcopy(P), folder).save_pretrained(pickled, safe_serialization=False)
    assert sorted(p.name for p in pickled.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    for given in (pickled, pickled / "adapter_model.bin"):
        with pytest.raises(RemoteDonorError, match="nngraft never unpickles weights") as error:
            LoraDonor(given)
    command = re.search(r'python -c "(.*)"', str(error.value)).group(1)
    subprocess.run([sys.executable, "-c", command], check=True)
    expected = Grafter(P, merged, tok).run(SPEC, PROMPTS, SPANS).logits
    close(run(P, LoraDonor(pickled), tok), expected)
    close(run(P, LoraDonor(pickled / "adapter_model.safetensors"), tok), expected)


def test_lora_for_another_model_is_refused(tmp_path):
    P, _, tok = tiny_pair("llama")
    other, _ = lora_adapter(tiny_pair("qwen2")[0], tmp_path / "q", r=4, lora_alpha=8,
                            target_modules=["up_proj"])
    donor = LoraDonor(other)
    donor.check_against(P)  # same module names and shapes: qwen2 tiny is llama-shaped
    gpt, _ = lora_adapter(tiny_pair("gpt2")[0], tmp_path / "g", r=4, lora_alpha=8, target_modules=["c_fc"])
    with pytest.raises(DonorMismatchError, match="does not have"):
        LoraDonor(gpt).check_against(P)
    wide = tiny_pair("llama")[0]
    wide.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(DonorMismatchError, match="do not fit"):
        LoraDonor(lora_adapter(P, tmp_path / "l", r=4, lora_alpha=8, target_modules=["up_proj"])[0]).params(
            "model.layers.0.mlp.up_proj", wide.model.layers[0].mlp.up_proj)
