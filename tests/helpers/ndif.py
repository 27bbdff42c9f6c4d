"""The remote-grafting tests' shared machinery: tiny P/F pairs per architecture (and a LoRA
donor), the prompts and the FE+LT spec they graft, the fresh-process stand-in server
(``Worker``, fixture ``worker``) and the fake NDIF endpoint (``FakeNDIF``, fixture ``fake_ndif``)."""

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
from nngraft import GraftRule, GraftSpec, Last, Span
from nngraft.donors.delta import DeltaDonor, DenseDonor, LoraDonor
from nngraft.backends.ndif import RemoteExecutionError
from nngraft.testing import tiny_pair


ATOL, RTOL = 2e-5, 1e-4


ARCHS = ("llama", "gpt2")


PROMPTS = ["Ada Lovelace stars in a movie alongside", "Q: Who stars in a movie with Grace Hopper? A:"]


SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]


SPEC = GraftSpec(name="fe_lt_everything", rules=[
    GraftRule(components=["everything"], positions=[Span(span="first_actor"), Last()])])


LORA_TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


@lru_cache(maxsize=None)
def models(arch: str):
    """(P, F, tokenizer, lora_dir, F_lora) — F_lora is P with the LoRA adapter merged (by PEFT)."""
    from peft import LoraConfig, get_peft_model

    P, F, tok = tiny_pair(arch)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS[arch], init_lora_weights=False,
                        fan_in_fan_out=arch == "gpt2", use_rslora=arch == "gpt2")
    peft_model = get_peft_model(copy.deepcopy(P), config)
    folder = Path(tmp_folder()) / f"lora_{arch}"
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload().eval()
    return P, F, tok, folder, merged


@lru_cache(maxsize=None)
def tmp_folder() -> str:
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="nngraft-remote-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def remote_donor(arch: str, kind: str):
    P, F, tok, lora_dir, merged = models(arch)
    if kind == "dense":
        return DenseDonor(F, dtype=torch.float32)
    if kind == "delta":
        return DeltaDonor(F, P, dtype=torch.float32)
    return LoraDonor(lora_dir, dtype=torch.float32)


class Worker:
    """Client side of tests/helpers/remote_worker.py."""

    def __init__(self, checkpoints: dict[str, Path], *, argv: list[str] | None = None, cwd: Path | None = None) -> None:
        """``argv``: another stand-in's script and arguments (tests/helpers/sandbox_server.py)."""
        script = Path(__file__).with_name("remote_worker.py")
        argv = argv or [str(script), *[f"{k}={v}" for k, v in checkpoints.items()]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.proc = subprocess.Popen([sys.executable, "-I", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=cwd or tmp_folder(), env=env)
        self._hello: dict | None = None
        self.lock = threading.Lock()
        self.calls: list[dict] = []

    @property
    def hello(self) -> dict:
        if self._hello is None:  # read lazily: the worker boots while the tests prepare models
            self._hello = json.loads(self._read())
        return self._hello

    def _read(self) -> bytes:
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            raise RuntimeError(f"the worker died (exit code {self.proc.poll()})")
        return self.proc.stdout.read(struct.unpack(">I", head)[0])

    def _write(self, data: bytes) -> None:
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()

    def run(self, model: str, metadata: str, blob: bytes) -> tuple[dict, bytes]:
        assert self.hello["ready"]
        with self.lock:
            self._write(json.dumps({"model": model, "metadata": metadata}).encode())
            self._write(blob)
            reply = json.loads(self._read())
            result = self._read()
        self.calls.append(reply)
        return reply, result

    def server(self, model: str):
        """A ``server(metadata, blob) -> bytes`` for Grafter.remote(execution=...)."""
        def serve(metadata: str, blob: bytes) -> bytes:
            reply, result = self.run(model, metadata, blob)
            if not reply["ok"]:
                raise RemoteExecutionError(reply["error"])
            return result
        return serve

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    checkpoints = {}
    for arch in ARCHS:
        P, _, tok = tiny_pair(arch)  # the same P as models(arch)[0]: same config, same seed
        folder = Path(tmp_folder()) / f"P_{arch}"
        P.save_pretrained(folder)
        tok.save_pretrained(folder)
        checkpoints[arch] = folder
    w = Worker(checkpoints)
    yield w
    w.close()


class FakeNDIF:
    """Answers nnsight's RemoteBackend like NDIF: /status, /subscribe (websocket), /request."""

    def __init__(self, worker, repo_id: str, model: str, key: str = "secret-key-123") -> None:
        self.worker, self.repo_id, self.model, self.key = worker, repo_id, model, key
        self.messages: list = []
        self.posted: list[dict] = []
        self.fail_with: str | None = None
        self.reject_with: "httpx.Response | None" = None  # an HTTP error answer to /request (e.g. 413)
        from nngraft.backends.preflight import client_versions

        # GET /env as NDIF answers it (the server's Python and packages; None: no /env, HTTP 404), and
        # the minimum client versions its API enforces (None: no gate), as NDIF's dependencies.py
        self.env: dict | None = {"python_version": sys.version, "packages": {"nnsight": client_versions()[0]}}
        self.min_nnsight: str | None = None
        self.min_python: str | None = None

    # websocket ---------------------------------------------------------------------------
    def create_connection(self, url, header=None):
        assert url.endswith("/subscribe")
        fake = self

        class Connection:
            def __init__(self):
                self.queue = [json.dumps({"session_id": "session-1"})]

            def recv(self):
                if not self.queue:
                    self.queue.extend(fake.messages)
                    fake.messages.clear()
                return self.queue.pop(0)

            def settimeout(self, t):
                pass

            def close(self):
                pass

        return Connection()

    # http --------------------------------------------------------------------------------
    def client(self, *args, **kwargs):
        import httpx

        fake = self

        class Client:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def post(self, url, data=None, files=None, headers=None):
                from nnsight.schema.response import ResponseModel, Status

                request = httpx.Request("POST", url)
                blob = files["blob"][1]
                fake.posted.append({"headers": dict(headers), "metadata": data["data"], "blob": blob})
                if headers.get("ndif-api-key") != fake.key:
                    return httpx.Response(401, json={"detail": "Invalid API key."}, request=request)
                refused = fake.version_refusal(headers)
                if refused:
                    return httpx.Response(400, json={"detail": refused}, request=request)
                if fake.reject_with is not None:
                    fake.reject_with.request = request
                    return fake.reject_with
                if fake.fail_with:
                    fake.messages.append(ResponseModel(id="job-1", status=Status.ERROR,
                                                       description=fake.fail_with).model_dump_json())
                else:
                    reply, result = fake.worker.run(fake.model, data["data"], blob)
                    if reply["ok"]:
                        fake.messages.append(ResponseModel(id="job-1", status=Status.COMPLETED,
                                                           data=result).pickle())
                    else:
                        fake.messages.append(ResponseModel(id="job-1", status=Status.ERROR,
                                                           description=reply["error"]).model_dump_json())
                return httpx.Response(200, text=ResponseModel(id="job-1", status=Status.RECEIVED).model_dump_json(),
                                      request=request)

        return Client()

    def version_refusal(self, headers) -> str | None:
        """NDIF's HTTP 400 answer to a client older than its minimums (its wording), or None."""
        from packaging.version import Version

        nnsight_version, python_version = headers.get("nnsight-version", ""), headers.get("python-version", "")
        if self.min_nnsight and Version(nnsight_version) < Version(self.min_nnsight):
            return (f"Client nnsight version {nnsight_version} is incompatible with the server nnsight version. "
                    f"The minimum supported version is {self.min_nnsight}. Please update nnsight to the latest "
                    "version: `pip install --upgrade nnsight`")
        mine = ".".join(python_version.split(".")[:2])
        if self.min_python and Version(mine) < Version(self.min_python):
            return (f"Client python version {mine} is incompatible with the server. The minimum supported "
                    f"version is {self.min_python}. Please update your python version and try again.")
        return None

    def get(self, url, *args, **kwargs):
        import httpx

        if url.endswith("/env"):
            if self.env is None:
                return httpx.Response(404, json={"detail": "Not Found"}, request=httpx.Request("GET", url))
            return httpx.Response(200, json=self.env, request=httpx.Request("GET", url))
        assert url.endswith("/status")
        deployments = {"d1": {"repo_id": self.repo_id, "application_state": "RUNNING", "deployment_level": "HOT"},
                       "d2": {"repo_id": "openai-community/gpt2", "application_state": "RUNNING"}}
        return httpx.Response(200, json={"deployments": deployments}, request=httpx.Request("GET", url))


@pytest.fixture
def fake_ndif(worker, monkeypatch):
    import httpx
    import websocket
    from nnsight.modeling import huggingface

    repo = "nngraft-tests/tiny-llama"
    folder = str(Path(tmp_folder()) / "P_llama")
    fake = FakeNDIF(worker, repo, "llama")
    monkeypatch.setattr(websocket, "create_connection", fake.create_connection)
    monkeypatch.setattr(httpx, "Client", fake.client)
    monkeypatch.setattr(httpx, "get", fake.get)
    monkeypatch.setitem(huggingface._ID_CACHE, folder, repo)  # the Hub's canonical id, without the Hub
    monkeypatch.setenv("NDIF_API_KEY", fake.key)
    fake.folder = folder
    return fake
