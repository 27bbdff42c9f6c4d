"""Safe by construction: nngraft never runs code it reads, never unpickles a user's file, and never
lets the NDIF API key out.

- The package source is scanned (with ``ast``) for calls that unpickle or evaluate: ``torch.load``
  without ``weights_only=True``, ``pickle``/``cloudpickle``/``dill``/``marshal`` loads, ``eval``,
  ``exec``, ``compile``, ``__import__``, dynamic imports, ``trust_remote_code=True``. The few
  legitimate uses are allow-listed below, each with its reason; a stale entry fails too.
- Donor paths that are pickles are refused; an *armed* pickle (one that creates a file when
  unpickled) proves that nothing on those paths unpickles it.
- With ``NDIF_API_KEY`` (or nnsight's saved key) set to a sentinel, the remote paths (NDIF mocked at
  the HTTP/websocket layer, requests run by the in-process server) and a tiny sweep never show it in
  output, logs, results, manifests or any file written.
- Specs are data: values that look like code are rejected by the schema, or kept as inert text.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pytest
import torch

import nngraft
from nngraft import DonorMismatchError, GraftRule, GraftSpec, Grafter, Last, SpecError
from nngraft.donors.donor import SafetensorsDonor, as_donor
from nngraft.testing import tiny_pair

PACKAGE = Path(nngraft.__file__).parent

# ---------------------------------------------------------------------------------------------
# (a) the source never unpickles or evaluates what it reads
# ---------------------------------------------------------------------------------------------

UNPICKLERS = {"pickle", "_pickle", "cloudpickle", "dill", "marshal", "joblib", "shelve", "jsonpickle"}

ALLOWED = {
    # (file, call): why it is safe
    ("cli/__init__.py", "importlib.import_module"):
        "imports nngraft's own plugin modules from a constant tuple; no name comes from input",
    ("__init__.py", "importlib.import_module"):
        "lazy public names: imports nngraft's own modules listed in the constant _EXPORTS table; any "
        "other attribute is an AttributeError before anything is imported",
    ("study/metric_registry.py", "importlib.import_module"):
        "--metric module:function: the user names their own function on their own command line or in "
        "Python (as `python -m` does); a sweep config, which may come from someone else, is refused "
        "when it names one (tests/study/test_metric_registry.py)",
    ("deprecated.py", "importlib.import_module"):
        "an old module path imports its new one, from the constant MOVED table; no name comes from input",
    ("backends/transport.py", "RequestModel.deserialize"):
        "InProcessServer (the local stand-in for NDIF) unpickles the request blob this same process "
        "serialized a moment before; it never reads a file or anything from the network",
    ("compile/trace.py", "compile"):
        "compiles the constant source 'compiled.apply(root)' into the graft's nnsight intervention "
        "block; no text from input is compiled",
    ("backends/transport.py", "tracer.execute"):
        "InProcessServer runs that request's trace code, written by nngraft itself (as NDIF does)",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return "?"


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) for every call in ``source`` that could unpickle, evaluate or import data."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS | {"torch"}:
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler", "load_pickle"):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append((node.value.lineno, "trust_remote_code=..."))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = name.split(".")
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" and not _is_true(keywords.get("weights_only")):
            found.append((node.lineno, name))
        elif parts[0] in UNPICKLERS and parts[-1] in ("load", "loads", "Unpickler", "open"):
            found.append((node.lineno, name))
        elif parts[-1] == "Unpickler":
            found.append((node.lineno, name))
        elif name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            found.append((node.lineno, name))
        elif name in ("importlib.import_module", "import_module", "runpy.run_path", "runpy.run_module"):
            found.append((node.lineno, name))
        elif parts[0] == "yaml" and parts[-1] in ("load", "load_all", "unsafe_load", "full_load"):
            found.append((node.lineno, name))
        elif parts[-1] == "load" and parts[0] in ("np", "numpy") and _is_true(keywords.get("allow_pickle")):
            found.append((node.lineno, name))
        elif parts[-1] in ("deserialize", "execute"):  # nnsight requests: unpickling / running trace code
            found.append((node.lineno, name))
    return sorted(found)


def test_the_scanner_finds_every_unsafe_pattern():
    snippet = """
import torch, pickle, yaml, importlib, numpy as np
from cloudpickle import loads
torch.load(f)
torch.load(f, weights_only=False)
pickle.loads(b)
pickle.Unpickler(f).load()
eval("1")
exec("x = 1")
compile("1", "f", "eval")
__import__("os")
importlib.import_module(name)
yaml.load(text)
np.load(f, allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=True)
RequestModel.deserialize(blob)
"""
    names = [name for _, name in unsafe_calls(snippet)]
    assert names == ["from cloudpickle import loads", "torch.load", "torch.load", "pickle.loads",
                     "pickle.Unpickler", "pickle.Unpickler().load", "eval", "exec", "compile", "__import__", "importlib.import_module",
                     "yaml.load", "np.load", "trust_remote_code=...", "RequestModel.deserialize"]
    safe = """
torch.load(f, weights_only=True)
yaml.safe_load(text)
json.loads(text)
re.compile("x")
torch.compile(model)
np.load(f)
safe_open(path, framework="pt")
model.eval()
AutoModel.from_pretrained(p, trust_remote_code=False)
"""
    assert unsafe_calls(safe) == []


def test_the_package_never_unpickles_or_evaluates_what_it_reads():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and PACKAGE / "donors" / "donor.py" in files
    seen = set()
    unexpected = []
    for file in files:
        rel = file.relative_to(PACKAGE).as_posix()
        for line, name in unsafe_calls(file.read_text()):
            if (rel, name) in ALLOWED:
                seen.add((rel, name))
            else:
                unexpected.append(f"nngraft/{rel}:{line}: {name}")
    assert unexpected == [], "unsafe calls (fix them, or allow-list them in ALLOWED with the reason)"
    assert seen == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - seen}"


# ---------------------------------------------------------------------------------------------
# (b) pickle checkpoints as donors are refused, never unpickled
# ---------------------------------------------------------------------------------------------


class _Armed:
    """Unpickling this creates ``marker``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@lru_cache(maxsize=None)
def pair():
    return tiny_pair("llama")


@pytest.fixture()
def armed(tmp_path):
    """An armed ``f.bin``, ``f.pt``, a transformers-style folder with ``pytorch_model.bin`` and a
    PEFT folder with ``adapter_model.bin``; checked to go off when unpickled."""
    marker = tmp_path / "UNPICKLED"
    P, F, _ = pair()
    state = {name: _Armed(marker) if name.endswith("up_proj.weight") else t for name, t in F.state_dict().items()}
    paths = {"bin": tmp_path / "f.bin", "pt": tmp_path / "f.pt", "folder": tmp_path / "F",
             "peft": tmp_path / "adapter"}
    torch.save(state, paths["bin"])
    torch.save(state, paths["pt"])
    paths["folder"].mkdir()
    F.config.save_pretrained(paths["folder"])
    torch.save(state, paths["folder"] / "pytorch_model.bin")
    paths["peft"].mkdir()
    (paths["peft"] / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"],
        "base_model_name_or_path": "tiny"}))
    torch.save({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": _Armed(marker)},
               paths["peft"] / "adapter_model.bin")
    torch.load(paths["bin"], weights_only=False)  # the trap works ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):  # ... and torch's safe mode refuses it
        torch.load(paths["bin"], weights_only=True)
    assert not marker.exists()
    return marker, paths


def test_pickle_checkpoints_are_refused_as_donors(armed):
    marker, paths = armed
    P, _, tok = pair()
    for path in (paths["bin"], str(paths["pt"])):
        with pytest.raises(DonorMismatchError, match=rf"{Path(path).name}\. nngraft never unpickles weight files"):
            Grafter(P, path, tok)
        with pytest.raises(DonorMismatchError, match="Convert it once: safetensors.torch.save_file"):
            as_donor(path)
    with pytest.raises(DonorMismatchError, match=r"F holds no \.safetensors weights, only pytorch_model\.bin"):
        Grafter(P, str(paths["folder"]), tok)
    with pytest.raises(DonorMismatchError, match="only pytorch_model.bin"):
        SafetensorsDonor(paths["folder"])
    assert not marker.exists()


def test_remote_donors_and_model_loading_never_unpickle(armed):
    from nngraft.donors.delta import DeltaDonor, DenseDonor, LoraDonor, RemoteDonorError

    marker, paths = armed
    P, F, tok = pair()
    with pytest.raises(DonorMismatchError, match="never unpickles"):
        DenseDonor(paths["bin"])
    with pytest.raises(DonorMismatchError, match="never unpickles"):
        DeltaDonor(paths["folder"], P)
    with pytest.raises(RemoteDonorError, match="has adapter_model.bin but no adapter_model.safetensors. "
                                               "nngraft never unpickles weights"):
        LoraDonor(paths["peft"])
    with pytest.raises(RemoteDonorError, match=r"(?s)adapter_model.bin is a pickled checkpoint. nngraft never "
                                               r"unpickles weights.*st.save_file\(torch.load\("):
        LoraDonor(paths["peft"] / "adapter_model.bin")
    # A model *folder* given as P is loaded by transformers, which reads .bin files with
    # torch.load(weights_only=True): refused, not run.
    with pytest.raises(Exception, match="(?i)weights.only"):
        Grafter(str(paths["folder"]), F, tok)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# (c) the NDIF API key never leaves the request header
# ---------------------------------------------------------------------------------------------

SENTINEL = "SENTINEL-NDIF-KEY-7f3a9c"
SAVED_SENTINEL = "SENTINEL-SAVED-KEY-51be02"


class _InProcessWorker:
    """tests/backends/test_ndif.py's FakeNDIF hands requests to a worker; this one runs them with
    nngraft's InProcessServer against P (no subprocess)."""

    def __init__(self) -> None:
        from nnsight.modeling.transformers import TransformersModel

        from nngraft.backends.ndif import InProcessServer

        P, _, tok = pair()
        self.server = InProcessServer(TransformersModel(P, tokenizer=tok, task="text-generation"))

    def run(self, model: str, metadata: str, blob: bytes) -> tuple[dict, bytes]:
        return {"ok": True}, self.server(metadata, blob)


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_api_key_never_appears_in_output_logs_results_or_files(tmp_path, monkeypatch, capfd, caplog):
    import httpx
    import websocket
    from nnsight.modeling import huggingface
    from nnsight.schema.config import CONFIG

    from nngraft.cli import main
    from nngraft.donors.delta import DenseDonor
    from nngraft.backends.ndif import RemoteExecutionError
    from nngraft.study.results import load_manifest, load_results
    from tests.helpers.ndif import FakeNDIF

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(type(CONFIG), "save", lambda self: pytest.fail("nnsight's config was saved"))
    P, F, tok = pair()
    hosted = tmp_path / "hosted" / "tiny-llama"  # what nnsight reads to build the hosted model's shell
    P.config.save_pretrained(hosted)
    tok.save_pretrained(hosted)
    repo = "nngraft-tests/tiny-llama"
    fake = FakeNDIF(_InProcessWorker(), repo, "llama", key=SENTINEL)
    monkeypatch.setattr(httpx, "get", fake.get)
    monkeypatch.setattr(httpx, "Client", fake.client)
    monkeypatch.setattr(websocket, "create_connection", fake.create_connection)
    monkeypatch.setitem(huggingface._ID_CACHE, str(hosted), repo)
    monkeypatch.setenv("NDIF_API_KEY", SENTINEL)
    monkeypatch.chdir(tmp_path)
    spec = GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], positions=[Last()])])
    prompts = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in"]

    # 1. a remote run on "NDIF" (verbose: it prints a line per request), equal to the local graft
    g = Grafter.remote(str(hosted), DenseDonor(F), dtype=torch.float32, verbose=True)
    remote = g.run(spec, prompts)
    torch.testing.assert_close(remote.logits, Grafter(P, F, tok).run(spec, prompts).logits, rtol=0, atol=0)
    assert fake.posted and all(p["headers"]["ndif-api-key"] == SENTINEL for p in fake.posted)  # it was used
    sent = [p["metadata"] for p in fake.posted] + [p["blob"] for p in fake.posted]
    texts = [repr(g), str(g.backend.requests), str(g.backend.last_report), g.backend.estimate(spec).summary()]
    # 2. a failing request: the server's error comes back, the key does not
    fake.fail_with = "Traceback ...\nCUDA out of memory"
    with pytest.raises(RemoteExecutionError) as failed:
        g.run(spec, prompts)
    texts.append(str(failed.value))
    # 3. the key from nnsight's saved config instead of the environment
    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(CONFIG.API, "APIKEY", SAVED_SENTINEL)
    fake.key, fake.fail_with = SAVED_SENTINEL, None
    Grafter.remote(str(hosted), DenseDonor(F), dtype=torch.float32).run(spec, prompts[:1])
    assert fake.posted[-1]["headers"]["ndif-api-key"] == SAVED_SENTINEL
    monkeypatch.setenv("NDIF_API_KEY", SENTINEL)
    # 4. the CLI: payload estimate, and a tiny sweep with results, manifest and plots
    spec.save(tmp_path / "lt_mlp.json")
    P.config.save_pretrained(tmp_path / "cfg")
    assert main(["payload", "lt_mlp.json", "--model", "cfg", "--donor", "dense"]) == 0
    (tmp_path / "sweep.json").write_text(json.dumps({
        "name": "key", "models": [{"name": "tiny", "tiny": "llama"}],
        "data": {"dataset": "fake_movies_real_actors", "n": 2, "templates": ["sentence_3"]},
        "specs": ["lt_mlp.json"], "output": "runs/key"}))
    assert main(["sweep", "sweep.json", "--no-progress", "--plot"]) == 0
    assert len(load_results("runs/key")) == 3 * 2 and load_manifest("runs/key")["models"]["tiny"]

    captured = capfd.readouterr()
    assert "nngraft → NDIF" in captured.err and "rows written" in captured.err  # output was captured
    written = _files_under(tmp_path)
    assert {"results.jsonl", "manifest.json", "aggregates.csv"} <= {p.name for p in written}
    for secret in (SENTINEL, SAVED_SENTINEL):
        assert secret not in captured.out and secret not in captured.err
        assert secret not in caplog.text
        assert all(secret not in text for text in texts)
        assert all(secret.encode() not in blob for blob in sent if isinstance(blob, bytes))
        assert all(secret not in text for text in sent if isinstance(text, str))
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"the key is in {path}"


# ---------------------------------------------------------------------------------------------
# (d) specs are data
# ---------------------------------------------------------------------------------------------

PAYLOADS = ["__import__('pathlib').Path('{marker}').touch()", "{{{{ open('{marker}', 'w') }}}}",
            "os.system('touch {marker}')"]


def _spec(**rule) -> str:
    base = {"components": ["mlp"], "layers": "all", "positions": [{"last": True}]}
    return json.dumps({"name": "s", "rules": [{**base, **rule}]})


@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_in_spec_fields_is_a_spec_error_and_runs_nothing(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "RAN"
    code = payload.format(marker=marker)
    bad = {
        "component": _spec(components=[code]),
        "layers": _spec(layers=code),
        "layer index": _spec(layers=[code]),
        "layer range": _spec(layers={"start": code, "stop": 2}),
        "index selector": _spec(positions=[{"index": [code]}]),
        "selector kind": _spec(positions=[{code: True}]),
        "not selector": _spec(positions=[{"not": [code]}]),
        "rule field": _spec(**{code: 1}),
        "top-level field": json.dumps({"name": "s", "rules": [], "__class__": code}),
        "schema version": json.dumps({"name": "s", "rules": [], "schema_version": code}),
        "whole spec": json.dumps(code),
    }
    for what, text in bad.items():
        path = tmp_path / "spec.json"
        path.write_text(text)
        with pytest.raises(SpecError):
            GraftSpec.load(path)
        with pytest.raises(SpecError):
            GraftSpec.from_json(text)
        assert not marker.exists(), f"loading a spec with code in its {what} ran it"
    # Free-text fields (name, description, span names) are kept verbatim as inert strings.
    inert = GraftSpec.from_json(json.dumps({"name": code, "description": code, "rules": [
        {"components": ["mlp"], "positions": [{"span": code}]}]}))
    assert inert.name == code and inert.description == code
    assert inert.rule_names_span() == {code}
    assert GraftSpec.from_json(inert.to_json()) == inert
    assert not marker.exists()


def test_code_in_a_sweep_config_runs_nothing(tmp_path):
    from nngraft.study.sweep import SweepConfigError, load_sweep_config, resolve_specs

    marker = tmp_path / "RAN"
    code = f"__import__('pathlib').Path('{marker}').touch()"
    config = tmp_path / "sweep.json"
    good = {"models": [{"name": "m", "tiny": "llama"}], "data": {"examples": "e.jsonl"}, "grid": "main"}
    for bad in ({**good, "models": [{"name": "m", "tiny": "llama", "dtype": code}]}, {**good, code: 1}):
        config.write_text(json.dumps(bad))
        with pytest.raises(SweepConfigError):
            load_sweep_config(config)
    config.write_text(json.dumps({**good, "grid": code}))
    with pytest.raises(Exception, match="grid"):
        resolve_specs(load_sweep_config(config))
    assert not marker.exists()
