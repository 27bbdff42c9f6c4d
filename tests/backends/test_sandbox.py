"""NDIF's sandboxed path: the request runs in a fresh process with a weightless P, and every
activation crosses a socket to the process that holds P (tests/helpers/sandbox_server.py).

The results must equal the local graft for dense, delta and LoRA donors on Llama and GPT-2, in
float32 (tight) and with P served in bfloat16 (at the tolerance derived in
``test_bfloat16_request_is_within_rounding_of_the_local_bfloat16_graft``); the activation traffic the harness measures
must equal what nngraft predicts from shapes (``nngraft.backends.traffic``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftSpec, Grafter
from nngraft.testing import tiny_pair

from tests.helpers.ndif import ARCHS, ATOL, PROMPTS, RTOL, SPANS, SPEC, Worker, models, remote_donor
from tests.helpers import HELPERS, ROOT

KINDS = ("dense", "delta", "lora")


def donor(arch: str, kind: str, dtype: torch.dtype):
    donor = remote_donor(arch, kind)
    donor.dtype = dtype
    return donor


def bf16(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in bfloat16, loaded the way a server loads it: ``from_pretrained(dtype=bfloat16)``,
    which keeps float32 buffers (Llama's rotary frequencies) in float32. (``.to(torch.bfloat16)``
    would round them too: a different model, up to 0.04 logit off on the tiny Llama.)"""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation=model.config._attn_implementation).eval()


@lru_cache(maxsize=None)
def local(arch: str, kind: str, dtype: torch.dtype = torch.float32):
    """The local graft (module-based donor) a sandboxed run must equal, with P and F in ``dtype``."""
    P, F, tok, _, merged = models(arch)
    F = {"plain": F, "dense": F, "delta": F, "lora": merged}[kind]
    if dtype != torch.float32:
        P, F = bf16(P), bf16(F)
    return Grafter(P, F, tok).run(GraftSpec() if kind == "plain" else SPEC, PROMPTS, SPANS)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    checkpoints = {}
    for arch in ARCHS:
        P, _, tok = tiny_pair(arch)
        folder = tmp_path_factory.mktemp(f"P_{arch}")
        P.save_pretrained(folder)
        tok.save_pretrained(folder)
        checkpoints[arch] = (folder, "float32")
        checkpoints[f"{arch}-bf16"] = (folder, "bfloat16")
    script = (HELPERS / "sandbox_server.py")
    args = [f"{key}={folder}={dtype}" for key, (folder, dtype) in checkpoints.items()]
    box = Worker({}, argv=[str(script), "host", *args], cwd=tmp_path_factory.mktemp("sandbox"))
    yield box
    box.close()


@lru_cache(maxsize=None)
def recipient(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    P = models(arch)[0]
    return P if dtype == torch.float32 else bf16(P)


def remote(sandbox, arch: str, kind: str, dtype: torch.dtype = torch.float32, spec=SPEC):
    tok = models(arch)[2]
    P = recipient(arch, dtype)  # the client's copy: shapes and dtype only (as NDIF's meta model)
    key = arch if dtype == torch.float32 else f"{arch}-bf16"
    g = Grafter.remote(P, donor(arch, kind, dtype), tok, execution=sandbox.server(key), verbose=False)
    return g.run(spec, PROMPTS, SPANS)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sandboxed_request_equals_local_graft(sandbox, arch, kind):
    out = remote(sandbox, arch, kind)
    reply = sandbox.calls[-1]
    assert reply["runner"]["all_meta"] is True  # the runner never held a weight
    assert reply["runner"]["blocked_modules"] == [] and reply["host_blocked_modules"] == []
    assert reply["stats"]["reads"] > 0  # activations did cross the socket
    expected = local(arch, kind).logits
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=RTOL)
    assert (out.logits - local(arch, "plain").logits).abs().max() > 1e-2  # the graft did something


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_request_is_within_rounding_of_the_local_bfloat16_graft(sandbox, arch, kind):
    """NDIF serves P in bfloat16, and donor tensors travel in bfloat16. The tolerance, derived:
    ε = max|local bfloat16 graft − local float32 graft| is what bfloat16 rounding does to this graft
    on these inputs. The sandboxed graft rounds P's output and the donor's correction separately
    where the local run rounds once with merged weights, so it may be up to 2ε from the exact
    (float32) result; hence within 2ε + ε = 3ε of the local bfloat16 graft. (Measured on the tiny
    models: at most 1.41ε from exact, on both paths; SmolLM2 in docs/remote.md.)"""
    out = remote(sandbox, arch, kind, torch.bfloat16).logits.float()
    reply = sandbox.calls[-1]
    assert reply["runner"]["all_meta"] is True
    assert reply["stats"]["read_bytes"] > 0
    exact, plain = local(arch, kind).logits, local(arch, "plain").logits
    here = local(arch, kind, torch.bfloat16).logits.float()
    eps = (here - exact).abs().max().item()
    assert eps > 0  # bfloat16 did round
    assert (out - exact).abs().max().item() <= 2 * eps
    assert (out - here).abs().max().item() <= 3 * eps
    assert 3 * eps < (exact - plain).abs().max().item() / 4  # far below the graft's own effect


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_paths_agree_bit_for_bit_and_a_dense_donor_equals_the_local_bfloat16_graft(sandbox, arch):
    """The in-process path (NDIF's trusted one) and the sandboxed one compute the same bits, for every
    donor kind; a dense donor computes exactly what the local bfloat16 graft computes (P loaded in
    bfloat16 as a server loads it)."""
    for kind in KINDS:
        P, tok = recipient(arch, torch.bfloat16), models(arch)[2]
        in_process = Grafter.remote(P, donor(arch, kind, torch.bfloat16), tok, execution="local",
                                    verbose=False).run(SPEC, PROMPTS, SPANS).logits
        sandboxed = remote(sandbox, arch, kind, torch.bfloat16).logits
        assert torch.equal(in_process, sandboxed), kind
        if kind == "dense":
            assert torch.equal(sandboxed.float(), local(arch, kind, torch.bfloat16).logits.float())


def test_the_sandbox_host_applies_the_request_environment(sandbox):
    """As NDIF's model actor does before every request: the host switches to the attention
    implementation the client resolved (it loaded the checkpoint with transformers' default, sdpa)."""
    P, tok = models("llama")[0], models("llama")[2]
    assert P.config._attn_implementation == "eager"
    remote(sandbox, "llama", "dense")
    assert sandbox.calls[-1]["runner"]["host_env"] == {"attn_implementation": "eager", "peft": None}


FAMILIES = {"LT": GraftSpec.load(ROOT / "recipes/specs/lt.json"),
            "FE+LT": GraftSpec.load(ROOT / "recipes/specs/fe_lt.json"),
            "everything": SPEC}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("arch", ARCHS)
def test_measured_traffic_equals_the_estimate(sandbox, arch, family):
    """What crosses the sandbox socket is what nngraft predicts from shapes, message for message."""
    from nngraft.backends.traffic import estimate_traffic

    P, _, tok, _, _ = models(arch)
    g = Grafter.remote(P, donor(arch, "delta", torch.float32), tok, execution=sandbox.server(arch), verbose=False)
    g.run(FAMILIES[family], PROMPTS, SPANS)
    measured = sandbox.calls[-1]["stats"]
    predicted = g.backend.last_traffic.sandbox_messages()
    assert {k: measured[k] for k in predicted} == predicted
    # the same numbers from the module paths alone (what `nngraft payload` uses)
    rows, tokens = len(PROMPTS), g.backend.requests[-1]["tokens"]
    paths = [i.path for i in g.backend.last_report.items if i.mode != "skip"]
    assert estimate_traffic(paths, P, rows, tokens, torch.float32).sandbox_messages() == predicted
    # reading every input and assigning every output (the program before) costs more
    before = estimate_traffic(paths, P, rows, tokens, torch.float32, share_inputs=False)
    assert before.round_trips > g.backend.last_traffic.round_trips and before.bytes > g.backend.last_traffic.bytes


def test_dataflow_finds_shared_inputs():
    from nngraft.backends.traffic import REQUEST_INPUT_IDS, dataflow

    llama = dataflow(models("llama")[0])
    assert llama.sources["model.embed_tokens"][0] == REQUEST_INPUT_IDS
    v_from = llama.sources["model.layers.0.self_attn.v_proj"]
    assert v_from[0] == "model.layers.0.input_layernorm.output"
    assert {"model.layers.0.self_attn.q_proj.input", "model.layers.0.self_attn.k_proj.input"} <= set(v_from)
    assert llama.sources["model.layers.1.mlp.up_proj"][0] == "model.layers.1.post_attention_layernorm.output"
    assert llama.sources["model.layers.1.mlp.down_proj"] == ()  # act(gate) * up: a new tensor
    assert all(llama.fresh[p] for p in ("model.embed_tokens", "model.norm", "lm_head"))
    gpt2 = dataflow(models("gpt2")[0])
    assert gpt2.sources["transformer.h.0.attn.c_attn"][0] == "transformer.h.0.ln_1.output"


def test_payload_command_reports_traffic(tmp_path, capsys, monkeypatch):
    from nngraft.arch import adapter_for
    from nngraft.backends.payload import format_bytes, spec_modules
    from nngraft.backends.traffic import estimate_traffic
    from nngraft.cli import main
    from nngraft.testing import tiny_config

    monkeypatch.setenv("COLUMNS", "250")
    tiny_config("llama").save_pretrained(tmp_path / "cfg")
    spec_file = tmp_path / "lt.json"
    FAMILIES["LT"].save(spec_file)
    assert main(["payload", str(spec_file), "--model", str(tmp_path / "cfg"), "--donor", "dense",
                 "--rows", "8", "--tokens", "16"]) == 0
    text = capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        P = AutoModelForCausalLM.from_config(tiny_config("llama"))
    paths = list(dict.fromkeys(p for p, _, _ in spec_modules([FAMILIES["LT"]], adapter_for(P), P.config)))
    t = estimate_traffic(paths, P, 8, 16, torch.bfloat16)
    row = next(line for line in text.splitlines() if "dense F tensors" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[-3:] == [str(t.reads), str(t.round_trips), format_bytes(t.bytes)]
    assert t.reads == 27 and t.round_trips == 54  # 18 modules: 9 inputs shared, plus the logits
    assert "8 rows × 16 tokens" in text


def test_a_model_the_weightless_probe_cannot_run_still_grafts(monkeypatch):
    """If a weightless forward fails for some architecture, programs read every input and assign
    every output (no sharing assumed), and the traffic is reported as unknown, not invented."""
    def fail(*args, **kwargs):
        raise RuntimeError("this model cannot run on the meta device")

    monkeypatch.setattr("nngraft.backends.traffic._probe", fail)
    monkeypatch.setattr("nngraft.backends.traffic._FLOWS", {})
    P, _, tok, _, _ = models("llama")
    g = Grafter.remote(P, donor("llama", "delta", torch.float32), tok, execution="local", verbose=False)
    out = g.run(SPEC, PROMPTS, SPANS)
    torch.testing.assert_close(out.logits, local("llama", "delta").logits, atol=ATOL, rtol=RTOL)
    assert g.backend.last_traffic is None and "activation_reads" not in g.backend.requests[-1]
