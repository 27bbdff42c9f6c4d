"""Hub LoRA donors: a request names the adapter (nnsight's ``peft=`` environment) and carries no
weights; the server attaches the adapter, the program gates its rank-r activation to the grafted
cells. Results must equal the local graft of the merged weights, in process (NDIF's trusted path),
in a fresh subprocess that has only P (tests/helpers/remote_worker.py) and through the sandboxed path
(tests/helpers/sandbox_server.py), on several architectures.

The Hub is stood in for by a Hugging Face cache folder in offline mode: the adapter folders PEFT
saved are put where ``huggingface_hub`` looks for a downloaded repository, so client and servers
resolve the same adapter *id* exactly as they would resolve a downloaded one.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.donors.delta import HubLoraDonor, LoraDonor
from nngraft.errors import RemoteDonorError, RemoteUnsupportedError
from nngraft.testing import tiny_pair
from tests.helpers.ndif import ATOL, PROMPTS, RTOL, SPANS, SPEC, Worker, tmp_folder, fake_ndif, worker  # noqa: F401
from tests.helpers import HELPERS

ARCHS = ("llama", "gpt2", "qwen2", "gemma2")
TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], "qwen2": ["k_proj", "o_proj", "up_proj"],
           "gemma2": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
HUB = Path(tmp_folder()) / "hub"


def _put_on_hub(repo: str, folder: Path, ref: str = "main") -> str:
    """Store ``folder`` as repository ``repo`` at ``ref`` in the stand-in Hub cache; its commit."""
    sha = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
    base = HUB / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        shutil.copy(item, snapshot / item.name)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(sha)
    return sha


@lru_cache(maxsize=None)
def pair(arch: str):
    """(P, tokenizer, Hub id of a LoRA adapter of P, P with the adapter merged by PEFT)."""
    from peft import LoraConfig, get_peft_model

    P, _, tok = tiny_pair(arch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                        fan_in_fan_out=arch == "gpt2", use_rslora=arch == "qwen2")
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(P), config)
    with torch.no_grad():  # an adapter that moves the logits visibly
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    folder = Path(tmp_folder()) / f"hub_lora_{arch}"
    peft_model.save_pretrained(folder)
    repo = f"nngraft-tests/tiny-{arch}-lora"
    _put_on_hub(repo, folder)
    merged = peft_model.merge_and_unload().eval()
    return P, tok, repo, merged


@pytest.fixture
def hub(monkeypatch):
    """This process resolves Hub ids from the stand-in cache, offline (as the servers below do)."""
    from huggingface_hub import constants

    HUB.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(HUB))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HUB


def _servers_env():
    return {"HF_HUB_CACHE": str(HUB), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A fresh trusted-path server and a sandboxed one, each holding P for every architecture and
    resolving adapter ids from the stand-in Hub."""
    checkpoints = {}
    for arch in ARCHS:
        P, tok, _, _ = pair(arch)
        folder = tmp_path_factory.mktemp(f"P_{arch}")
        P.save_pretrained(folder)
        tok.save_pretrained(folder)
        checkpoints[arch] = folder
    saved = dict(os.environ)
    os.environ.update(_servers_env())
    try:
        trusted = Worker(checkpoints)
        script = (HELPERS / "sandbox_server.py")
        sandboxed = Worker({}, argv=[str(script), "host", *[f"{a}={f}=float32" for a, f in checkpoints.items()]],
                           cwd=tmp_path_factory.mktemp("sandbox"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield {"trusted": trusted, "sandboxed": sandboxed}
    trusted.close()
    sandboxed.close()


@lru_cache(maxsize=None)
def expected(arch: str, spec_name: str = "everything"):
    P, tok, _, merged = pair(arch)
    return Grafter(P, merged, tok).run(SPECS[spec_name], PROMPTS, SPANS).logits


SPECS = {"everything": SPEC,
         "mlp at the entity": GraftSpec(name="mlp_fe", rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor")])]),
         "nothing": GraftSpec()}


def run(arch: str, execution, spec=SPEC):
    P, tok, repo, _ = pair(arch)
    g = Grafter.remote(P, HubLoraDonor(repo), tok, execution=execution, verbose=False)
    return g, g.run(spec, PROMPTS, SPANS)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_in_process_equals_the_dense_graft_of_merged_weights(hub, arch):
    P, tok, repo, merged = pair(arch)
    before = {n: p.clone() for n, p in P.named_parameters()}
    for name, spec in SPECS.items():
        g, out = run(arch, "local", spec)
        torch.testing.assert_close(out.logits, expected(arch, name), atol=ATOL, rtol=RTOL)
    report = g.backend.last_report
    assert all(item.bytes == 0 for item in report.items if item.mode in ("gate", "off"))
    assert report.total_bytes < 1000  # the gate masks: no weights
    # the caller's P is untouched: the adapter went onto a copy
    assert not any("lora" in n for n, _ in P.named_modules())
    assert all(torch.equal(p, before[n]) for n, p in P.named_parameters())


def test_the_graft_does_something_and_nothing_grafted_is_P(hub):
    plain = Grafter(*pair("llama")[:1], pair("llama")[0], pair("llama")[1]).run(GraftSpec(), PROMPTS, SPANS).logits
    _, out = run("llama", "local", GraftSpec())
    # the adapter is attached everywhere, and gated off everywhere: P, to float rounding
    torch.testing.assert_close(out.logits, plain, atol=1e-6, rtol=0)
    assert (expected("llama") - plain).abs().max() > 0.05


@pytest.mark.parametrize("path", ["trusted", "sandboxed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_servers_equal_the_dense_graft_with_no_weights_in_the_request(hub, stand_ins, arch, path):
    server = stand_ins[path]
    P, tok, repo, merged = pair(arch)
    g = Grafter.remote(P, HubLoraDonor(repo), tok, execution=server.server(arch), verbose=False)
    out = g.run(SPEC, PROMPTS, SPANS)
    torch.testing.assert_close(out.logits, expected(arch), atol=ATOL, rtol=RTOL)
    request = g.backend.requests[-1]
    lora = LoraDonor(Path(tmp_folder()) / f"hub_lora_{arch}")
    adapter_bytes = sum(t.numel() * 4 for f in lora.factors.values() for t in f.values())
    assert request["request_bytes"] < adapter_bytes / 4 + 200_000  # what nnsight sends: no weights in it
    reply = server.calls[-1]
    if path == "sandboxed":
        assert reply["runner"]["all_meta"] is True
        assert reply["runner"]["host_env"]["peft"] == repo  # the host attached the adapter by its id
        measured = reply["stats"]
        predicted = g.backend.last_traffic.sandbox_messages()
        assert {k: measured[k] for k in predicted} == predicted  # r numbers per token per adapted module


def test_traffic_is_rank_numbers_per_token(hub):
    from nngraft.backends.traffic import estimate_traffic

    g, _ = run("llama", "local")
    traffic = g.backend.last_traffic
    rows, tokens = len(PROMPTS), g.backend.requests[-1]["tokens"]
    gates = [a for a in traffic.accesses if a.location.endswith("lora_A.default.output")]
    assert len(gates) == 2 * 5  # 2 layers × 5 adapted modules, each read once (and written back)
    assert all(a.bytes == rows * tokens * 4 * 4 for a in gates)  # rank 4, float32
    P = pair("llama")[0]
    dense = estimate_traffic([p for p, _ in _leaf_paths(g)], P, rows, tokens, torch.float32)
    assert traffic.bytes < dense.bytes / 2
    # the same numbers from shapes alone (what benchmarks/hub_lora_traffic.py uses for 8B and 70B)
    from nngraft.backends.hub_lora import estimate_hub_traffic

    shapes = estimate_hub_traffic(P, TARGETS["llama"], 4, rows, tokens, dtype=torch.float32)
    assert shapes.sandbox_messages() == traffic.sandbox_messages()


def _leaf_paths(g):
    return [(i.path, i) for i in g.backend.last_report.items if i.mode == "gate"]


def test_ordinary_local_grafter_takes_the_same_donor(hub):
    P, tok, repo, merged = pair("gpt2")
    out = Grafter(P, HubLoraDonor(repo), tok).run(SPEC, PROMPTS, SPANS)
    torch.testing.assert_close(out.logits, expected("gpt2"), atol=ATOL, rtol=RTOL)


def test_ndif_refuses_a_local_folder_and_a_revision_that_is_not_main(hub, fake_ndif, tmp_path):
    from nngraft.backends.setup import _check_hub_donor_for_ndif

    folder = Path(tmp_folder()) / "hub_lora_llama"
    pair("llama")
    with pytest.raises(RemoteDonorError, match="is a folder on this machine; NDIF loads adapters from the Hugging Face Hub"):
        Grafter.remote(fake_ndif.folder, HubLoraDonor(str(folder)))
    repo = pair("llama")[2]
    _put_on_hub(repo, folder, ref="experiment")
    with pytest.raises(RemoteDonorError, match=r"revision 'experiment' is commit [0-9a-f]{12}, but NDIF loads its "
                                               r"main branch \(commit [0-9a-f]{12}\)"):
        _check_hub_donor_for_ndif(HubLoraDonor(repo, revision="experiment"))
    _check_hub_donor_for_ndif(HubLoraDonor(repo, revision="main"))  # main itself is fine


def test_ndif_request_names_the_adapter_and_carries_no_weights(hub, fake_ndif, worker, monkeypatch):
    """Through nnsight's own client code (network mocked): the request's environment names the
    adapter (what NDIF's _remoteable_set_env applies)."""
    import json

    P, tok, repo, merged = pair("llama")
    # the trusted stand-in of test_backends_ndif has the same tiny Llama P; give it the Hub too
    monkeypatch.setattr(fake_ndif, "worker", _trusted_with_hub())
    g = Grafter.remote(fake_ndif.folder, HubLoraDonor(repo), verbose=False)
    out = g.run(SPEC, PROMPTS, SPANS)
    torch.testing.assert_close(out.logits, expected("llama"), atol=ATOL, rtol=RTOL)
    env = json.loads(fake_ndif.posted[-1]["metadata"])["env"]
    assert env["peft"] == repo
    assert len(fake_ndif.posted[-1]["blob"]) < 60_000


@lru_cache(maxsize=None)
def _trusted_with_hub():
    P, tok, _, _ = pair("llama")
    folder = Path(tmp_folder()) / "P_llama_hub"
    P.save_pretrained(folder)
    tok.save_pretrained(folder)
    saved = dict(os.environ)
    os.environ.update(_servers_env())
    try:
        return Worker({"llama": folder})
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_part_of_a_fused_projection_is_refused(hub):
    P, tok, repo, _ = pair("gpt2")
    q_only = GraftSpec(name="q", rules=[GraftRule(components=["q"], positions=[Last()])])
    g = Grafter.remote(P, HubLoraDonor(repo), tok, execution="local", verbose=False)
    with pytest.raises(RemoteUnsupportedError, match="fused projection.*only part of its output"):
        g.run(q_only, PROMPTS, SPANS)


def test_a_hub_donor_must_be_the_only_donor(hub):
    P, tok, repo, merged = pair("llama")
    with pytest.raises(RemoteUnsupportedError, match="must be the only donor"):
        Grafter.remote(P, HubLoraDonor(repo), tok, donors={"other": merged}, execution="local")


def test_traffic_table_meets_the_one_percent_target():
    """benchmarks/hub_lora_traffic.py (docs/benchmarks.md): per request, a Hub LoRA donor moves at most
    1 % of the bytes a dense donor moves (uploaded + sandbox), for Llama-3-8B and 70B shapes."""
    from benchmarks.hub_lora_traffic import run

    rows = run()
    for model in ("Llama-3-8B", "Llama-3-70B"):
        mine = {r["donor"].split(" (")[0]: r for r in rows if r["model"] == model}
        dense, hub = mine["dense F tensors"], mine["Hub LoRA r=16"]
        assert hub["uploaded"] < 100_000  # masks and nnsight's overhead: no weights
        assert hub["uploaded"] + hub["sandbox_bytes"] <= 0.01 * (dense["uploaded"] + dense["sandbox_bytes"])
        assert hub["round_trips"] < dense["round_trips"]
