"""Pre-flight for NDIF: every refusal NDIF (or the Hub) can give is caught before anything is sent,
with one clear error. Each is tested against a stand-in answering the way the real service does:
NDIF's API (``FakeNDIF``: /status, /env, /request with its version gate and its error wording) and
the Hugging Face Hub (an HTTP transport answering a gated repository as the Hub does)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nngraft import Grafter
from nngraft.donors.delta import DenseDonor, LoraDonor
from nngraft.errors import ArgumentError, ClientVersionError, GatedModelError, RemoteDonorMismatch, RemoteTimeoutError
from nngraft.backends import preflight
from nngraft.backends.ndif import RemoteTimeoutWarning
from tests.helpers.ndif import PROMPTS, SPANS, SPEC, fake_ndif, models, worker  # noqa: F401 - fixtures


def test_the_nnsight_pin_allows_the_nnsight_we_test():
    from importlib.metadata import version
    from packaging.specifiers import SpecifierSet

    pin = preflight.nnsight_requirement()
    assert SpecifierSet(pin) == SpecifierSet(">=0.8,<0.9")  # what pyproject.toml asks for
    assert version("nnsight") in SpecifierSet(pin)
    assert preflight.client_versions()[0] == version("nnsight")  # what nnsight's headers report


# -- versions ---------------------------------------------------------------------------------


def test_client_older_than_the_server_is_refused_before_sending(fake_ndif):
    mine = preflight.client_versions()[0]
    fake_ndif.env["packages"]["nnsight"] = "0.8.99"
    with pytest.raises(ClientVersionError) as error:
        Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]))
    message = str(error.value)
    assert f"nnsight {mine} here, 0.8.99 on NDIF (pip install 'nnsight==0.8.99')" in message
    assert "HTTP 400" in message and "Nothing was sent" in message
    assert fake_ndif.posted == []


def test_a_server_ahead_of_nngrafts_nnsight_range_says_to_upgrade_nngraft(fake_ndif):
    fake_ndif.env["packages"]["nnsight"] = "0.9.0"
    with pytest.raises(ClientVersionError, match=r"supports nnsight<0\.9,>=0\.8, so no nnsight it accepts "
                                                 r"matches the server: upgrade nngraft"):
        Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]))


def test_python_older_than_the_server_is_refused(fake_ndif):
    import sys

    fake_ndif.env["python_version"] = "3.99.1 (main, Jan  1 2030) [GCC 99]"
    mine = ".".join(map(str, sys.version_info[:2]))
    with pytest.raises(ClientVersionError, match=rf"Python {mine} here, 3\.99 on NDIF"):
        Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]))


def test_same_or_newer_client_passes():
    preflight.check_client_versions({"python_version": "3.10.4", "packages": {"nnsight": "0.8.0"}},
                                    client=("0.8.1", "3.11.2 (main)"))
    with pytest.raises(ClientVersionError, match="reports no version"):
        preflight.check_client_versions({"python_version": "3.10", "packages": {"nnsight": "0.8.0"}},
                                        client=("", "3.11.2"))


def test_the_servers_own_version_refusal_is_translated(fake_ndif):
    """A server without /env (or one whose minimum is not its own version) refuses with HTTP 400;
    that answer becomes the same ClientVersionError, with the server's sentence."""
    fake_ndif.env = None  # GET /env: 404
    fake_ndif.min_nnsight = "0.8.99"
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), verbose=False)
    with pytest.raises(ClientVersionError) as error:
        g.run(SPEC, PROMPTS[:1], SPANS[:1])
    message = str(error.value)
    assert "NDIF refused this client's versions (HTTP 400): Client nnsight version" in message
    assert "The minimum supported version is 0.8.99" in message
    assert "nngraft supports nnsight<0.9,>=0.8" in message and fake_ndif.key not in message


def test_check_versions_false_leaves_it_to_the_server(fake_ndif):
    fake_ndif.env["packages"]["nnsight"] = "0.8.99"  # would be refused by the pre-flight
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1], dtype=torch.float32), check_versions=False,
                       verbose=False)
    expected = Grafter(*models("llama")[:2], models("llama")[2]).run(SPEC, PROMPTS[:1], SPANS[:1]).logits
    torch.testing.assert_close(g.run(SPEC, PROMPTS[:1], SPANS[:1]).logits, expected, atol=2e-5, rtol=1e-4)


# -- gated repositories -----------------------------------------------------------------------


@pytest.fixture
def gated_hub(monkeypatch, tmp_path):
    """The Hub as it answers a gated repository to a client without access: HTTP 401 with
    ``X-Error-Code: GatedRepo`` (what huggingface_hub turns into GatedRepoError)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    seen = []

    def answer(request):
        seen.append(str(request.url))
        return httpx2.Response(401, headers={"X-Error-Code": "GatedRepo",
                                             "X-Error-Message": "Access to model meta-llama/Llama-3.1-8B is restricted."},
                               request=request)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", lambda: httpx2.Client(transport=httpx2.MockTransport(answer)))
    return seen


@pytest.mark.parametrize("token", [False, True])
def test_gated_recipient_names_the_token(fake_ndif, gated_hub, monkeypatch, token):
    from nnsight.modeling import huggingface

    repo = "meta-llama/Llama-3.1-8B"
    fake_ndif.repo_id = repo
    monkeypatch.setitem(huggingface._ID_CACHE, repo, repo)
    if token:
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(GatedModelError) as error:
        Grafter.remote(repo, DenseDonor(models("llama")[1]))
    message = str(error.value)
    assert any(f"{repo}/resolve/" in url for url in gated_hub)  # it did ask the Hub for a file
    assert f"'{repo}' is a gated repository on the Hugging Face Hub" in message
    assert f"https://huggingface.co/{repo}" in message
    if token:
        assert "no access to this repository yet: request access" in message
    else:
        assert "export HF_TOKEN=hf_..." in message and "https://huggingface.co/settings/tokens" in message
    assert "hf_not_a_real_token" not in message
    assert "Traceback" not in message and fake_ndif.posted == []


# -- renamed base models ----------------------------------------------------------------------


def test_alias_table():
    for old, new in preflight.BASE_MODEL_ALIASES.items():
        assert preflight.same_base(old, new) and preflight.same_base(new, old)
        assert preflight.same_base(old.upper(), new)  # Hub ids are case-insensitive
        assert preflight.canonical_name(new) == new.lower()  # a current name maps to itself
    assert not preflight.same_base("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-70B")
    assert not preflight.same_base("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.1-8B")  # Llama 3, not 3.1


@pytest.mark.parametrize("base, accepted", [
    ("meta-llama/Meta-Llama-3.1-8B", True),          # the old name of the recipient's repository
    ("META-LLAMA/llama-3.1-8b", True),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", False),  # another model
])
def test_lora_recorded_under_a_renamed_repository(fake_ndif, tmp_path, monkeypatch, base, accepted):
    from nnsight.modeling import huggingface

    repo = "meta-llama/Llama-3.1-8B"
    fake_ndif.repo_id = repo
    monkeypatch.setitem(huggingface._ID_CACHE, fake_ndif.folder, repo)
    monkeypatch.setitem(huggingface._ID_CACHE, base, base)  # the Hub's answer, without the Hub
    lora = tmp_path / "lora"
    shutil.copytree(models("llama")[3], lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (lora / "adapter_config.json").write_text(json.dumps(config))
    if accepted:
        g = Grafter.remote(fake_ndif.folder, LoraDonor(lora), dtype=torch.float32, verbose=False)
        P, _, tok, _, merged = models("llama")
        expected = Grafter(P, merged, tok).run(SPEC, PROMPTS, SPANS).logits
        torch.testing.assert_close(g.run(SPEC, PROMPTS, SPANS).logits, expected, atol=2e-5, rtol=1e-4)
    else:
        with pytest.raises(RemoteDonorMismatch, match=f"trained on '{base}'.*BASE_MODEL_ALIASES"):
            Grafter.remote(fake_ndif.folder, LoraDonor(lora))


# -- execution timeout ------------------------------------------------------------------------


def test_a_request_predicted_past_the_timeout_warns_with_the_estimate_before_sending(fake_ndif):
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), execution_timeout_s=1.0, verbose=False,
                       check_identities=False)  # the run's one request (the guard's would warn too)
    with pytest.warns(RemoteTimeoutWarning) as warned:
        g.run(SPEC, PROMPTS, SPANS)
    request = g.backend.requests[-1]
    traffic = g.backend.last_traffic
    expected = preflight.estimate_seconds(traffic.round_trips, traffic.bytes, request["donor_bytes"] + 70_000)
    assert request["estimate_s"] == pytest.approx(expected)
    text = str(warned[0].message)
    assert f"predicted to take about {expected:.0f} s ({traffic.round_trips} sandbox round trips" in text
    assert "over NDIF's execution timeout (assumed 1 s" in text and "batch_size=" in text
    assert len(fake_ndif.posted) == 1  # a warning: the request was still sent


def test_no_warning_under_the_timeout(fake_ndif, recwarn):
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), verbose=False)
    g.run(SPEC, PROMPTS[:1], SPANS[:1])
    assert not [w for w in recwarn if issubclass(w.category, RemoteTimeoutWarning)]
    assert g.backend.requests[-1]["estimate_s"] < preflight.DEFAULT_EXECUTION_TIMEOUT_S


def test_estimate_grows_with_round_trips_and_bytes():
    base = preflight.estimate_seconds(0, 0, 0)
    model = preflight.TimeModel()
    assert base == model.forward_s
    assert preflight.estimate_seconds(1000, 0, 0) == pytest.approx(base + 1000 * model.round_trip_s)
    assert preflight.estimate_seconds(0, 10**9, 0) == pytest.approx(base + 1e9 / model.socket_bytes_per_s)
    assert preflight.estimate_seconds(0, 0, 10**7) == pytest.approx(base + 1e7 / model.upload_bytes_per_s)
    assert preflight.estimate_seconds(1000, 10**9, 0, sandboxed=False) == base


@pytest.mark.parametrize("said", ["Your job exceeded the execution timeout of 30s.",
                                  "Job took longer than timeout: 30 seconds"])
def test_ndif_stopping_a_request_at_its_timeout(fake_ndif, said):
    fake_ndif.fail_with = said
    g = Grafter.remote(fake_ndif.folder, DenseDonor(models("llama")[1]), verbose=False)
    with pytest.raises(RemoteTimeoutError, match=r"execution timeout of 30 s; nngraft predicted about \d+ s.*"
                                                 r"execution_timeout_s=30"):
        g.run(SPEC, PROMPTS[:1], SPANS[:1])


def test_timeout_setting_is_checked(monkeypatch):
    from nngraft.backends.ndif import NdifBackend

    monkeypatch.setenv("NNGRAFT_NDIF_TIMEOUT_S", "soon")
    with pytest.raises(ArgumentError, match="NNGRAFT_NDIF_TIMEOUT_S should be a number of seconds > 0, got 'soon'"):
        NdifBackend()
    monkeypatch.setenv("NNGRAFT_NDIF_TIMEOUT_S", "90")
    assert NdifBackend().execution_timeout_s == 90.0
    with pytest.raises(ArgumentError, match="execution_timeout_s"):
        NdifBackend(execution_timeout_s=-1)
