"""`nngraft donor compress`: F − P per module as a LoRA adapter by truncated SVD (nngraft.donors.compress).

At full rank the adapter is F exactly on the compressed modules (checked through the graft, on two
architectures: Llama's nn.Linear and GPT-2's Conv1D); at an energy E every module keeps at least E
of ‖ΔW‖² with the smallest rank that does; the reported errors are the factors' own; the CLI
refuses bad input with one message and exit 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.arch import get_module
from nngraft.donors.compress import compress_donor, default_modules
from nngraft.donors.delta import LoraDonor, layout_of, to_map
from nngraft.errors import ArgumentError, DonorMismatchError
from nngraft.testing import tiny_pair

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Q: Who stars in a movie with Grace Hopper? A:"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
FE_LT = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])


def linear_only(P, F):
    """F's linear weights on P (what a LoRA adapter can hold), everything else P's."""
    G = copy.deepcopy(P)
    with torch.no_grad():
        for path in default_modules(P):
            get_module(G, path).weight.copy_(get_module(F, path).weight)
    return G


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_is_exact(tmp_path, arch):
    P, F, tok = tiny_pair(arch)
    report = compress_donor(F, P, tmp_path / "adapter", rank=10_000)
    assert all(m.rank == m.full_rank and m.rel_error < 1e-6 and m.energy > 1 - 1e-9 for m in report.modules)
    assert {m.path for m in report.modules} == set(default_modules(P))
    expected = Grafter(P, linear_only(P, F), tok).run(FE_LT, PROMPTS, SPANS).logits
    got = Grafter(P, LoraDonor(tmp_path / "adapter"), tok).run(FE_LT, PROMPTS, SPANS).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # what a LoRA cannot hold is reported, not hidden: F also changed norms and embeddings
    dropped = dict(report.dropped)
    assert dropped and all(change > 0 for change in dropped.values())
    compressed = {m.path for m in report.modules}
    assert not any(name.rpartition(".")[0] in compressed and name.endswith(".weight") for name in dropped)


def test_energy_threshold_is_respected_with_the_smallest_rank(tmp_path):
    P, F, _ = tiny_pair("llama")
    report = compress_donor(F, P, tmp_path / "a", energy=0.8)
    folder = LoraDonor(tmp_path / "a")
    for m in report.modules:
        module = get_module(P, m.path)
        delta = to_map((get_module(F, m.path).weight - module.weight).detach().double(), layout_of(module))
        s2 = torch.linalg.svdvals(delta).pow(2)
        assert s2[:m.rank].sum() / s2.sum() >= 0.8 - 1e-9  # enough energy ...
        assert s2[:m.rank - 1].sum() / s2.sum() < 0.8  # ... with the smallest rank that has it
        # the reported error is the saved factors' own
        a, b = folder.factors[m.path]["A"].double(), folder.factors[m.path]["B"].double()
        assert folder.scale(m.path) == 1.0
        error = float((delta - b @ a).norm() / delta.norm())
        assert error == pytest.approx(m.rel_error, rel=1e-4)
        assert m.energy == pytest.approx(float(s2[:m.rank].sum() / s2.sum()))
    assert len({m.rank for m in report.modules}) > 1  # per-module ranks (rank_pattern) ...
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["r"] == max(m.rank for m in report.modules)


def test_a_fixed_rank_and_the_modules_a_spec_grafts(tmp_path):
    from nngraft.cli import main

    P, F, tok = tiny_pair("llama")
    for name, model in (("P", P), ("F", F)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    spec = GraftSpec(name="mlp1", rules=[GraftRule(components=["mlp"], layers=[1], positions=[Last()])])
    spec.save(tmp_path / "mlp1.json")
    assert main(["donor", "compress", str(tmp_path / "F"), str(tmp_path / "P"), "--out", str(tmp_path / "a"),
                 "--rank", "3", "--spec", str(tmp_path / "mlp1.json"), "--base-model", "org/p"]) == 0
    adapter = LoraDonor(tmp_path / "a")
    assert sorted(adapter.factors) == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
    assert all(f["A"].shape[0] == 3 for f in adapter.factors.values())
    assert adapter.base_model == "org/p"


def test_cli_refusals(tmp_path, capsys):
    from nngraft.cli import main

    P, F, tok = tiny_pair("llama")
    for name, model in (("P", P), ("F", F)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    base = ["donor", "compress", str(tmp_path / "F"), str(tmp_path / "P"), "--out", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as exit_code:  # neither --rank nor --energy: a usage error
        main(base)
    assert exit_code.value.code == 2
    with pytest.raises(SystemExit) as exit_code:
        main(base + ["--rank", "4", "--energy", "0.9"])
    assert exit_code.value.code == 2
    assert main(base + ["--energy", "1.5"]) == 2
    assert "--energy should be a fraction in (0, 1], got 1.5" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("x")
    assert main(base + ["--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not an empty folder" in err and "Traceback" not in err
    assert (tmp_path / "a" / "mine.txt").read_text() == "x"


def test_python_refusals(tmp_path):
    P, F, _ = tiny_pair("llama")
    with pytest.raises(ArgumentError, match="exactly one of rank= .* or energy="):
        compress_donor(F, P, tmp_path / "x")
    with pytest.raises(ArgumentError, match="rank: Input should be an integer >= 1, got 0"):
        compress_donor(F, P, tmp_path / "x", rank=0)
    with pytest.raises(ArgumentError, match="has no 2-D weight"):
        compress_donor(F, P, tmp_path / "x", rank=2, modules=["model.norm"])
    with pytest.raises(DonorMismatchError, match="nothing to compress"):
        compress_donor(P, P, tmp_path / "y", rank=2)
    other, _, _ = tiny_pair("gpt2")
    with pytest.raises(DonorMismatchError, match="not the same architecture"):
        compress_donor(other, P, tmp_path / "z", rank=2)
