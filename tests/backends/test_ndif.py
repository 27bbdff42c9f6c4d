"""nngraft.backends.ndif (remote grafting): requests survive nnsight's remote serialization and give the local numbers.

The central tests serialize each request exactly as nnsight's RemoteBackend does, then run it in a
FRESH subprocess (tests/helpers/remote_worker.py) that has only P — loaded from a checkpoint folder, as a
server loads its deployment — and cannot import nngraft or the tests, the way an NDIF model actor
runs a request. Results must equal the local graft for dense, delta and LoRA donors on two
architectures. Other tests pin down the silent no-op trap, the pre-flight checks, the payload
sizes, and the network path (HTTP and websocket mocked, the real nnsight client code in between).
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.donors.delta import DeltaDonor, DenseDonor, LoraDonor, RemoteDonorError
from nngraft.backends.ndif import (
    ForeignModuleError,
    ModelNotAvailableError,
    PayloadTooLargeError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteExecutionError,
    RemoteUnsupportedError,
    ServerEnvironmentError,
    check_model_available,
    transport_class,
)
from nngraft.testing import TINY_MODEL_TYPES, tiny_pair
from tests.helpers.ndif import (ARCHS, ATOL, PROMPTS, RTOL, SPANS, SPEC, FakeNDIF, Worker,  # noqa: F401
                               fake_ndif, models, remote_donor, tmp_folder, worker)


@lru_cache(maxsize=None)
def local_run(arch: str, kind: str):
    """The local graft (core Grafter, module-based donor) every remote result must equal."""
    P, F, tok, _, merged = models(arch)
    donor = {"plain": F, "dense": F, "delta": F, "lora": merged}[kind]
    return Grafter(P, donor, tok).run(GraftSpec() if kind == "plain" else SPEC, PROMPTS, SPANS)


# ---------------------------------------------------------------------------------------------
# The stand-in server: one fresh subprocess for the whole module
# ---------------------------------------------------------------------------------------------


def test_worker_is_a_clean_server(worker):
    """The stand-in server holds only P, and nngraft is not importable there."""
    assert worker.hello["ready"] and worker.hello["models"] == sorted(ARCHS)
    assert worker.hello["nngraft_importable"] is False


# ---------------------------------------------------------------------------------------------
# The central test
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "delta", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_request_run_by_fresh_server_equals_local_graft(worker, arch, kind):
    P, F, tok, _, _ = models(arch)
    donor = remote_donor(arch, kind)
    local = local_run(arch, kind)
    expected, plain = local.logits, local_run(arch, "plain").logits

    g = Grafter.remote(P, donor, tok, execution=worker.server(arch), verbose=False)
    out = g.run(SPEC, PROMPTS, SPANS)

    assert worker.calls[-1]["ok"] and worker.calls[-1]["foreign_modules"] == []
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=RTOL)
    assert (out.logits - plain).abs().max() > 1e-2  # the graft did something
    # the same result object as a local run, with the same helpers
    assert type(out) is type(local) and list(out.spec_names) == list(local.spec_names)
    torch.testing.assert_close(out.target_prob("Alan"), local.target_prob("Alan"), atol=1e-6, rtol=1e-4)


def test_run_grid_remote_equals_local(worker):
    P, F, tok, _, _ = models("llama")
    specs = [SPEC, GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], layers="last:1",
                                                             positions=[Last()])])]
    # locally the rows of each prompt share its prefix (call_cost=0 forces it on a tiny model);
    # remotely there is no KV cache between requests, so every row runs its whole prompt
    expected = Grafter(P, F, tok, call_cost=0).run_grid(specs, PROMPTS, SPANS)
    g = Grafter.remote(P, DeltaDonor(F, P, dtype=torch.float32), tok, execution=worker.server("llama"),
                      verbose=False)
    assert g.share_prefix is False
    got = g.run_grid(specs, PROMPTS, SPANS)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name].logits, expected[name].logits, atol=ATOL, rtol=RTOL)
    assert len([r for r in g.backend.requests if "purpose" not in r]) == 1  # four rows, one request (+ the guard's)


def test_named_donors_per_rule_remote_equals_local(worker):
    """Rules that name another donor ("donor": NAME) work remotely as locally, one request."""
    from nngraft.testing import perturbed_copy

    P, F, tok, _, _ = models("gpt2")
    H = perturbed_copy(P, seed=7)
    spec = GraftSpec(name="two_donors", rules=[
        GraftRule(components=["attn"], positions=[Span(span="first_actor")], donor="h"),
        GraftRule(components=["mlp", "q"], positions=[Last()])])
    expected = Grafter(P, F, tok, donors={"h": H}).run(spec, PROMPTS, SPANS).logits
    g = Grafter.remote(P, DenseDonor(F, dtype=torch.float32), tok, donors={"h": DeltaDonor(H, P, dtype=torch.float32)},
                      execution=worker.server("gpt2"), verbose=False)
    torch.testing.assert_close(g.run(spec, PROMPTS, SPANS).logits, expected, atol=ATOL, rtol=RTOL)
    assert any(i.path.endswith("c_attn (h)") for i in g.backend.last_report.items)
    with pytest.raises(Exception, match="'h'"):
        Grafter.remote(P, DenseDonor(F), tok, execution=worker.server("gpt2"), verbose=False).run(spec, PROMPTS, SPANS)


def test_parameter_level_grafts_remote_equal_local(worker):
    """Rules with "weights" (part of ΔW: rank, neurons, heads, top entries per layer) remotely."""
    P, F, tok, _, _ = models("llama")
    spec = GraftSpec.model_validate({"name": "parts", "rules": [
        {"components": ["mlp"], "layers": "last:1", "positions": [{"last": True}], "weights": {"rank": 2}},
        {"components": ["up", "down"], "layers": "first:1", "positions": [{"last": True}],
         "weights": {"neurons": [1, 5, 9]}},
        {"components": ["q", "o"], "positions": [{"span": "first_actor"}], "weights": {"heads": [1]}},
        {"components": ["k", "v"], "positions": [{"last": True}],
         "weights": {"top_percent": 10, "per": "layer"}}]})
    expected = Grafter(P, F, tok).run(spec, PROMPTS, SPANS).logits
    plain = local_run("llama", "plain").logits
    g = Grafter.remote(P, DeltaDonor(F, P, dtype=torch.float32), tok, execution=worker.server("llama"),
                      verbose=False)
    got = g.run(spec, PROMPTS, SPANS).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-3
    rank_part = [i for i in g.backend.last_report.items if i.path.startswith("model.layers.1.mlp.down_proj")]
    assert rank_part and rank_part[0].bytes == 2 * (32 + 64) * 4  # two factors, not the dense ΔW
    estimate = g.backend.estimate(spec)
    assert estimate.total_bytes >= g.backend.last_report.total_bytes
    with pytest.raises(RemoteDonorError, match="DeltaDonor"):
        Grafter.remote(P, DenseDonor(F), tok, execution="local", verbose=False).run(spec, PROMPTS, SPANS)


# ---------------------------------------------------------------------------------------------
# The silent no-op trap
# ---------------------------------------------------------------------------------------------


def _graft_with_envoy(P_nn, F_nn, ids, backend):
    """A hand-written remote graft that calls F's MLP envoy — the trap."""
    with P_nn.trace(input_ids=ids, backend=backend):
        x = P_nn.model.layers[1].mlp.input
        P_nn.model.layers[1].mlp.output = F_nn.model.layers[1].mlp(x)
        logits = P_nn.output.logits.save()
    return logits


def test_envoy_reference_is_a_silent_noop_on_the_server_and_is_refused(worker):
    from nnsight.modeling.transformers import TransformersModel

    P, F, tok, _, _ = models("llama")
    P_nn = TransformersModel(P, tokenizer=tok, task="text-generation")
    F_nn = TransformersModel(F, tokenizer=tok, task="text-generation")
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        plain = P(ids).logits
        grafted_here = _graft_with_envoy(P_nn, F_nn, ids, None)  # locally F's envoy is F's module
    assert (grafted_here - plain).abs().max() > 1e-2

    Backend = transport_class()
    known = P_nn._remoteable_persistent_objects()
    unchecked = Backend("local:llama", known=known, limit_bytes=None, server=worker.server("llama"),
                        host="http://localhost", api_key="", check=False)
    on_server = _graft_with_envoy(P_nn, F_nn, ids, unchecked)
    # the server resolved F's envoy to P's own MLP: the "graft" did nothing, and nothing said so
    torch.testing.assert_close(on_server, plain, atol=ATOL, rtol=RTOL)

    checked = Backend("local:llama", known=known, limit_bytes=None, server=worker.server("llama"),
                      host="http://localhost", api_key="")
    n = len(worker.calls)
    with pytest.raises(ForeignModuleError, match="silently do nothing") as error:
        _graft_with_envoy(P_nn, F_nn, ids, checked)
    assert "module(s) of a model other than the recipient" in str(error.value)
    assert len(worker.calls) == n  # refused before anything was sent


def test_envoy_as_donor_is_refused():
    import nnsight
    from nnsight.modeling.transformers import TransformersModel

    P, F, tok, _, _ = models("llama")
    for envoy in (nnsight.NNsight(F), TransformersModel(F, tokenizer=tok, task="text-generation")):
        with pytest.raises(RemoteDonorError, match="silently do nothing"):
            Grafter.remote(P, envoy, tok, execution="local")
        with pytest.raises(RemoteDonorError, match="silently do nothing"):
            DeltaDonor(envoy, P)


def test_raw_module_in_a_request_is_refused():
    from nnsight.modeling.transformers import TransformersModel

    P, _, tok, _, _ = models("llama")
    F = tiny_pair("llama")[1]  # a fresh F: never wrapped in an envoy, so its modules carry no path tag
    P_nn = TransformersModel(P, tokenizer=tok, task="text-generation")
    backend = transport_class()("local:llama", known=P_nn._remoteable_persistent_objects(), limit_bytes=None,
                               server=lambda m, b: b"", host="http://localhost", api_key="")
    with pytest.raises(ForeignModuleError, match="whole LlamaForCausalLM module"):
        _graft_with_envoy(P_nn, F, torch.tensor([[5, 6, 7]]), backend)


def _trace_with_object(P_nn, payload, backend):
    with P_nn.trace(input_ids=torch.tensor([[5, 6, 7]]), backend=backend):
        kept = payload
        logits = P_nn.output.logits.save()
    return kept, logits


def test_objects_the_server_cannot_import_are_refused():
    from nnsight.modeling.transformers import TransformersModel

    P, F, tok, _, _ = models("llama")
    P_nn = TransformersModel(P, tokenizer=tok, task="text-generation")
    plan = Grafter(P, F, tok).plan(SPEC, PROMPTS[:1], SPANS[:1])  # an nngraft object
    backend = transport_class()("local:llama", known=P_nn._remoteable_persistent_objects(), limit_bytes=None,
                               server=lambda m, b: b"", host="http://localhost", api_key="")
    with pytest.raises(ServerEnvironmentError, match="'nngraft'"):
        _trace_with_object(P_nn, plan, backend)


# ---------------------------------------------------------------------------------------------
# Pre-flight: spec validation, payload estimate and limit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "delta", "rank2", "lora"])
def test_estimate_equals_what_is_sent(kind):
    P, F, tok, lora_dir, _ = models("llama")
    donor = {"dense": DenseDonor(F), "delta": DeltaDonor(F, P), "rank2": DeltaDonor(F, P, rank=2),
             "lora": LoraDonor(lora_dir)}[kind]
    g = Grafter.remote(P, donor, tok, execution="local", dtype=torch.bfloat16, verbose=False)
    estimate = g.backend.estimate(SPEC)
    g.run(SPEC, PROMPTS, SPANS)
    sent = g.backend.last_report
    assert estimate.total_bytes == sent.total_bytes > 0
    assert sent.dtype == "bfloat16"
    assert {i.path for i in estimate.items if i.mode == "skip"} == set(sent.skipped)
    request = g.backend.requests[-1]["request_bytes"]
    assert sent.total_bytes < request < sent.total_bytes + 200_000  # tensors + envoy tree + inputs


def test_request_overhead_is_small_and_tensors_dominate():
    """The serialized request = donor tensors + a fixed overhead (envoy tree, code, inputs)."""
    P, F, tok, _, _ = models("llama")
    g = Grafter.remote(P, DenseDonor(F), tok, execution="local", verbose=False)
    g.run(GraftSpec(), PROMPTS, SPANS)
    empty = g.backend.requests[-1]["request_bytes"]
    g.run(SPEC, PROMPTS, SPANS)
    full = g.backend.requests[-1]
    extra = full["request_bytes"] - empty
    assert full["donor_bytes"] <= extra <= full["donor_bytes"] * 1.25


def test_all_logits_remote_equals_local():
    P, F, tok, _, _ = models("llama")
    expected = Grafter(P, F, tok).run(SPEC, PROMPTS, SPANS, all_logits=True)
    got = Grafter.remote(P, DenseDonor(F), tok, execution="local", verbose=False).run(SPEC, PROMPTS, SPANS,
                                                                                     all_logits=True)
    assert len(got.all_logits) == len(expected.all_logits) == 2
    for a, b in zip(got.all_logits, expected.all_logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_qkv_parts_at_different_positions(arch):
    """q, k and v of one fused projection grafted at different tokens: one module, feature slices."""
    from nngraft import Index

    P, F, tok = tiny_pair(arch)
    spec = GraftSpec(name="qkv_apart", rules=[
        GraftRule(components=["q"], positions=[Span(span="first_actor")]),
        GraftRule(components=["k"], positions=[Last(), Index(index=[1])]),
        GraftRule(components=["v"], layers=[0], positions=[Index(index=[1])])])
    expected = Grafter(P, F, tok).run(spec, PROMPTS, SPANS).logits
    g = Grafter.remote(P, DeltaDonor(F, P), tok, execution="local", verbose=False)
    torch.testing.assert_close(g.run(spec, PROMPTS, SPANS).logits, expected, atol=ATOL, rtol=RTOL)
    assert (expected - local_plain(arch)).abs().max() > 1e-3


@lru_cache(maxsize=None)
def local_plain(arch: str) -> torch.Tensor:
    P, F, tok = tiny_pair(arch)
    return Grafter(P, F, tok).run(GraftSpec(), PROMPTS, SPANS).logits


def test_payload_limit_refuses_before_sending():
    P, F, tok, _, _ = models("llama")
    calls = []
    g = Grafter.remote(P, DenseDonor(F), tok, execution=lambda m, b: calls.append(b), max_payload_mb=0.01,
                      verbose=False)
    with pytest.raises(PayloadTooLargeError, match=r"over the limit of 10\.0 kB.*DeltaDonor"):
        g.run(SPEC, PROMPTS, SPANS)
    assert calls == []


def test_spec_is_validated_against_the_model():
    from nngraft.errors import ComponentNotFoundError, LayerRangeError

    P, F, tok, _, _ = models("gpt2")
    g = Grafter.remote(P, DenseDonor(F), tok, execution="local", verbose=False)
    with pytest.raises(ComponentNotFoundError, match="gate"):
        g.backend.estimate(GraftSpec(rules=[GraftRule(components=["gate"], positions=[Last()])]))
    with pytest.raises(LayerRangeError):
        g.backend.estimate(GraftSpec(rules=[GraftRule(components=["mlp"], layers=[7], positions=[Last()])]))


def test_donor_of_another_size_is_refused():
    from nngraft.errors import DonorMismatchError

    P, _, tok, _, _ = models("llama")
    _, F3, _ = tiny_pair("llama", n_layers=3)
    F_wide = tiny_pair("qwen2")[1]
    with pytest.raises(DonorMismatchError, match="the donor is 'qwen2'"):  # refused before any request
        Grafter.remote(P, DenseDonor(F_wide), tok, execution="local", verbose=False)
    with pytest.raises(DonorMismatchError, match="num_hidden_layers=2 but the donor has num_hidden_layers=3"):
        Grafter.remote(P, DenseDonor(F3), tok, execution="local", verbose=False)
    lora = models("gpt2")[3]
    with pytest.raises(DonorMismatchError, match="does not have"):
        Grafter.remote(P, LoraDonor(lora), tok, execution="local", verbose=False)


def test_generation_is_refused_remotely():
    P, F, tok, _, _ = models("llama")
    g = Grafter.remote(P, DenseDonor(F), tok, execution="local", verbose=False)
    with pytest.raises(RemoteUnsupportedError, match="generation"):
        g.generate(SPEC, PROMPTS[:1], SPANS[:1])


# ---------------------------------------------------------------------------------------------
# Functional forms: every graftable module of every tiny architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [a for a in TINY_MODEL_TYPES if a not in ARCHS])
def test_in_process_round_trip_equals_local_graft_on_other_architectures(arch):
    """The serialize → deserialize → execute round trip, in process, on the other 9 architectures."""
    P, F, tok = tiny_pair(arch)
    expected = Grafter(P, F, tok).run(SPEC, PROMPTS, SPANS).logits
    got = Grafter.remote(P, DeltaDonor(F, P), tok, execution="local", verbose=False).run(SPEC, PROMPTS, SPANS)
    torch.testing.assert_close(got.logits, expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# The network path: NDIF mocked at the HTTP / websocket layer, nnsight's client code unchanged
# ---------------------------------------------------------------------------------------------


def test_ndif_path_end_to_end_with_mocked_network(fake_ndif):
    P, F, tok, lora_dir, merged = models("llama")
    expected = Grafter(P, merged, tok).run(SPEC, PROMPTS, SPANS).logits
    g = Grafter.remote(fake_ndif.folder, LoraDonor(lora_dir), dtype=torch.float32, verbose=False)
    out = g.run(SPEC, PROMPTS, SPANS)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=RTOL)
    posted = fake_ndif.posted[-1]
    assert posted["headers"]["ndif-api-key"] == fake_ndif.key
    assert fake_ndif.key.encode() not in posted["blob"]  # the key travels in the header only
    assert fake_ndif.key not in posted["metadata"] and fake_ndif.key not in repr(g)
    assert json.loads(posted["metadata"])["compress"] is True  # nnsight's default, zstd


def test_ndif_bad_key_is_a_clear_error(fake_ndif, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "wrong-key-456")
    P, F, tok, _, _ = models("llama")
    g = Grafter.remote(fake_ndif.folder, DenseDonor(F), verbose=False)
    with pytest.raises(RemoteAuthError, match="HTTP 401.*NDIF_API_KEY") as error:
        g.run(SPEC, PROMPTS[:1], SPANS[:1])
    assert "wrong-key-456" not in str(error.value)


def test_ndif_refusing_the_websocket_is_an_auth_error(fake_ndif, monkeypatch):
    import websocket

    def refuse(url, header=None):
        raise websocket.WebSocketBadStatusException("Handshake status %d %s", 401, "Unauthorized")

    monkeypatch.setattr(websocket, "create_connection", refuse)
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), verbose=False)
    with pytest.raises(RemoteAuthError, match="refused the connection \\(HTTP 401\\)"):
        g.run(SPEC, PROMPTS[:1], SPANS[:1])

    def down(url, header=None):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(websocket, "create_connection", down)
    with pytest.raises(RemoteConnectionError, match="could not reach NDIF"):
        g.run(SPEC, PROMPTS[:1], SPANS[:1])


def test_ndif_missing_key_is_refused_before_anything_is_sent(fake_ndif, monkeypatch):
    from nnsight.schema.config import CONFIG

    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteAuthError, match="NDIF_API_KEY"):
        Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]))
    assert fake_ndif.posted == []


def test_ndif_server_error_carries_the_servers_message(fake_ndif):
    fake_ndif.fail_with = "Traceback ...\nCUDA out of memory"
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), verbose=False)
    with pytest.raises(RemoteExecutionError, match="CUDA out of memory"):
        g.run(SPEC, PROMPTS[:1], SPANS[:1])


def test_ndif_413_is_payload_too_large_with_the_size_and_what_to_do(fake_ndif):
    import httpx

    # what a proxy in front of NDIF answers: plain text, not FastAPI's JSON
    fake_ndif.reject_with = httpx.Response(413, text="413 Request Entity Too Large")
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), verbose=False)
    with pytest.raises(PayloadTooLargeError) as error:
        g.run(SPEC, PROMPTS[:1], SPANS[:1])
    message = str(error.value)
    sent = len(fake_ndif.posted[-1]["blob"])
    assert "too large for the server (HTTP 413)" in message
    assert "Request Entity Too Large" in message
    from nngraft.backends.payload import format_bytes
    assert f"The request was {format_bytes(sent)} as sent (" in message  # the real size, and raw
    for advice in ("batch_size=", "DeltaDonor or LoraDonor of lower rank", "fewer grafted modules",
                   "max_payload_mb=", "docs/remote.md"):
        assert advice in message
    assert fake_ndif.key not in message


def test_translate_413_without_a_known_size():
    import httpx
    from nnsight.intervention.backends.remote import RemoteError

    from nngraft.errors import RemoteGraftError
    from nngraft.backends.ndif import translate_remote_error

    def fake(status: int) -> Exception:  # nnsight's RemoteError, raised from httpx's status error
        request = httpx.Request("POST", "https://ndif.example/request")
        response = httpx.Response(status, text="too big", request=request)
        error = RemoteError("Failed to send request: too big")
        error.__cause__ = httpx.HTTPStatusError("status", request=request, response=response)
        return error

    translated = translate_remote_error(fake(413), "https://ndif.example")
    assert type(translated) is PayloadTooLargeError
    assert str(translated).startswith("NDIF (https://ndif.example) refused the request as too large "
                                      "for the server (HTTP 413): Failed to send request: too big. Send less")
    assert "The request was" not in str(translated)  # no size invented when none is known
    assert "1.5 MB as sent (3.0 MB before compression)" in str(
        translate_remote_error(fake(413), "h", sent_bytes=1_500_000, raw_bytes=3_000_000))
    assert type(translate_remote_error(fake(403), "h")) is RemoteAuthError
    other = translate_remote_error(fake(500), "h")
    assert type(other) is RemoteGraftError and "HTTP 500" in str(other)


def test_model_not_running_on_ndif(fake_ndif, monkeypatch):
    from nnsight.modeling import huggingface

    monkeypatch.setitem(huggingface._ID_CACHE, "meta-llama/Nope", "meta-llama/Nope")
    with pytest.raises(ModelNotAvailableError, match=r"'meta-llama/Nope' is not running.*openai-community/gpt2"):
        Grafter.remote("meta-llama/Nope", DenseDonor(models("llama")[1]))
    with pytest.raises(RemoteConnectionError, match="could not read"):
        check_model_available("x/y", "http://ndif.invalid", get=_unreachable)


def _unreachable(url):
    raise OSError("connection refused")


def test_lora_trained_on_another_base_is_refused(fake_ndif, tmp_path):
    import shutil

    from nngraft.backends.ndif import RemoteDonorMismatch

    lora = tmp_path / "lora"
    shutil.copytree(models("llama")[3], lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Meta-Llama-3.1-8B-Instruct"
    (lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteDonorMismatch, match="trained on 'meta-llama/Meta-Llama-3.1-8B-Instruct'"):
        Grafter.remote(fake_ndif.folder, LoraDonor(lora))


# ---------------------------------------------------------------------------------------------
# Grafts inside nnsight traces, remotely: the same `with g.trace(...)` block
# ---------------------------------------------------------------------------------------------


def _trace_block(g, arch: str):
    """The block a user writes; the same code locally and remotely. Reads layer 0's (grafted) MLP
    output at the last token, halves it, saves layer 1's hidden states and the logits."""
    lm = g.model_envoy
    layers = lm.model.layers if arch == "llama" else lm.transformer.h
    with g.trace(SPEC, PROMPTS, spans=SPANS):
        mlp0 = layers[0].mlp.output[:, -1].clone().save()
        layers[0].mlp.output[:, -1] *= 0.5
        hidden = layers[1].output[0].save() if arch == "gpt2" else layers[1].output.save()
        logits = lm.output.logits.save()
    return mlp0, hidden, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_trace_block_runs_remotely_and_saves_come_back(worker, arch):
    """g.trace on a remote Grafter: the block, with the graft as an nnsight edit, is serialized and
    run by the fresh server; the user's saves equal the same block run locally, and the graft
    really ran there (the saved MLP output differs from P's)."""
    P, F, tok, _, _ = models(arch)
    local = Grafter(P, F, tok)
    expected = _trace_block(local, arch)
    g = Grafter.remote(P, DeltaDonor(F, P, dtype=torch.float32), tok, execution=worker.server(arch), verbose=False)
    got = _trace_block(g, arch)
    assert worker.calls[-1]["ok"] and worker.calls[-1]["foreign_modules"] == []
    for remote_value, local_value in zip(got, expected):
        assert isinstance(remote_value, torch.Tensor) and remote_value.shape == local_value.shape
        torch.testing.assert_close(remote_value, local_value.detach(), atol=ATOL, rtol=RTOL)
    lm = local.model_envoy
    layers = lm.model.layers if arch == "llama" else lm.transformer.h
    with lm.trace(**local.compile(GraftSpec(), PROMPTS, SPANS).inputs):
        p_mlp0 = layers[0].mlp.output[:, -1].save()
    assert (got[0] - p_mlp0).abs().max() > 1e-3


def test_remote_trace_refuses_the_grafter_inside_the_block(worker):
    from nngraft.errors import RemoteGraftError

    P, F, tok, _, _ = models("llama")
    g = Grafter.remote(P, DenseDonor(F, dtype=torch.float32), tok, execution=worker.server("llama"), verbose=False)
    with pytest.raises(ServerEnvironmentError, match=r"the trace refers to the Grafter 'g'.*lm = g.model_envoy"):
        with g.trace(SPEC, PROMPTS, spans=SPANS):
            hidden = g.model_envoy.model.layers[1].output.save()  # noqa: F841
    with pytest.raises(RemoteGraftError, match=r"compiled by a local Grafter"):
        g.open_trace(Grafter(P, F, tok).compile(SPEC, PROMPTS, SPANS))


def test_request_check_runs_after_nnsight_prepared_the_environment(tmp_path, monkeypatch):
    """nnsight registers local (not installed) modules to travel by value right before it
    serializes; the check must judge that request, not the one before (which it would refuse)."""
    import importlib

    import nnsight.ndif
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from nnsight.modeling.transformers import TransformersModel

    from nngraft.backends.ndif import InProcessServer

    (tmp_path / "nngraft_test_local_helpers.py").write_text("def triple(x):\n    return x * 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = importlib.import_module("nngraft_test_local_helpers")
    monkeypatch.setattr(nnsight.ndif, "_PULLED_ENV", False)
    by_value = set(_PICKLE_BY_VALUE_MODULES)
    try:
        P, _, tok, _, _ = models("llama")
        P_nn = TransformersModel(P, tokenizer=tok, task="text-generation")
        backend = transport_class()("local:llama", known=P_nn._remoteable_persistent_objects(), limit_bytes=None,
                                   server=InProcessServer(P_nn), host="http://localhost", api_key="")
        ids = torch.tensor([[5, 6, 7]])
        with P_nn.trace(input_ids=ids, backend=backend):
            tripled = helpers.triple(P_nn.output.logits).save()
        assert "nngraft_test_local_helpers" in _PICKLE_BY_VALUE_MODULES  # nnsight's doing, not ours
        with torch.no_grad():
            torch.testing.assert_close(tripled, 3 * P(ids).logits)
        assert backend.raw_bytes > 0 and backend.sent_bytes > 0
    finally:
        _PICKLE_BY_VALUE_MODULES.clear()
        _PICKLE_BY_VALUE_MODULES.update(by_value)
