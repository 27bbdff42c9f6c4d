"""Every bad input gets a clear error: its type, and a message that names the problem.

The cases here are also the source of docs/errors.md: run ``python -m tests.test_errors`` to
regenerate it from the real messages (a test fails when the page is out of date).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch

from nngraft import (
    ComponentNotFoundError,
    DonorMismatchError,
    GraftRule,
    GraftSpec,
    Grafter,
    Index,
    Last,
    LayerRangeError,
    PositionError,
    Span,
    SpanAlignmentWarning,
    SpanNotFoundError,
    SpecError,
    TensorDonor,
    UnsupportedArchitectureError,
)
from nngraft.study.errors import DataError
from nngraft.errors import (ArgumentError, GraftError, IdentityCheckError, ModelLoadError, ModelNotAvailableError,
                            OutputExistsError, PayloadTooLargeError, PromptError, RemoteAuthError,
                            TraceError)
from nngraft.study.bundle import BundleError, FingerprintMismatchError
from nngraft.study.results import OutputInUseError, ResultsError, TruncatedResultsWarning
from nngraft.study.sweep import SweepConfigError
from nngraft.testing import tiny_model, tiny_pair
from tests.helpers import ROOT

DOC = ROOT / "docs" / "errors.md"


@lru_cache(maxsize=None)
def pair(model_type: str = "llama"):
    return tiny_pair(model_type)


@lru_cache(maxsize=None)
def grafter(model_type: str = "llama") -> Grafter:
    P, F, tok = pair(model_type)
    return Grafter(P, F, tok)


def spec(*rules: GraftRule, name: str = "s") -> GraftSpec:
    return GraftSpec(name=name, rules=list(rules))


MLP_LT = GraftRule(components=["mlp"], positions=[Last()])


@dataclass
class Case:
    number: int
    title: str
    given: str
    run: Callable[[], object]
    error: type
    match: str
    handling: str = "raised"
    shown: Callable[[str], str] | None = None  # the message as docs/errors.md shows it (if it varies by run)
    cli: bool = False  # the row shows what the command line prints for this error (exit code 2)


def _gpt2_gate():
    grafter("gpt2").run(spec(GraftRule(components=["gate"], positions=[Last()]), name="gates"), ["Ada stars in"])


def _shape_mismatch():
    P, _, tok = pair()
    Grafter(P, TensorDonor({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}, source="f.safetensors"), tok).run(
        spec(GraftRule(components=["up"], layers=[1], positions=[Last()])), ["Ada stars in"])


def _missing_tensor():
    P, F, tok = pair()
    partial = {k: v for k, v in F.named_parameters() if "layers.1.mlp.up_proj" not in k}
    Grafter(P, TensorDonor(partial, source="f.safetensors"), tok).run(spec(MLP_LT), ["Ada stars in"])


def _unsupported():
    model = tiny_model("llama")
    model.config.model_type = "mamba"
    Grafter(model, model, pair()[2])


def _two_donors():
    from nngraft.testing import perturbed_copy

    P, F, tok = pair()
    Grafter(P, F, tok, donors={"hybrid": perturbed_copy(P)}).run(
        spec(GraftRule(components=["o"], positions=[Last()]),
             GraftRule(components=["o"], layers=[0], positions=[Last()], donor="hybrid"), name="clash"),
        ["Ada stars in"])


def _partial_token():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpanAlignmentWarning)
        grafter().run(spec(GraftRule(components=["mlp"], positions=[Span(span="who")])),
                      ["Q: Who stars with Grace Hopper?"], spans=[{"who": "Gra"}])


def _no_offsets():
    class SlowTokenizer:
        def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
            if return_offsets_mapping:
                raise NotImplementedError
            return {"input_ids": [1, 2]}

    from nngraft.compile.tokens import tokenize_prompt

    tokenize_prompt(SlowTokenizer(), "Ada stars", {"first_actor": "Ada"})


# -- 19: grafts inside nnsight traces ----------------------------------------------------------


def _graft_outside_trace():
    import nnsight

    import nngraft

    nngraft.graft(nnsight.NNsight(pair()[0]), grafter().compile(spec(MLP_LT), ["Ada stars in"]))


def _graft_after_a_read():
    import nnsight

    import nngraft

    model = nnsight.NNsight(pair()[0])
    compiled = grafter().compile(spec(MLP_LT), ["Ada stars in"])
    with model.trace(**compiled.inputs):
        model.model.embed_tokens.output.save()
        nngraft.graft(model, compiled)


def _graft_on_other_inputs():
    import nnsight

    import nngraft

    model = nnsight.NNsight(pair()[0])
    compiled = grafter().compile(spec(MLP_LT), ["Ada stars in", "Grace Hopper stars in"])
    with model.trace(**grafter().compile(spec(MLP_LT), ["Ada stars in"]).inputs):
        nngraft.graft(model, compiled)
        model.output.logits.save()


# -- 17: results files on resume ------------------------------------------------------------

ROW = {"model": "tiny", "spec": "p", "example": "f1/s3", "prob": 0.25}


@contextlib.contextmanager
def _scratch_folder():
    """A fresh temp folder as the working directory, so messages show short, stable paths."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # (contextlib.chdir needs Python 3.11; nngraft supports 3.10)
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)


def _prepare_resume(folder: Path, results_text: str) -> None:
    """A tiny sweep config whose output folder already holds ``results_text``."""
    from nngraft.study.examples import TestExample
    from nngraft.study.sweep import save_examples_jsonl

    save_examples_jsonl([TestExample("f1", "s3", "Ada Lovelace stars in a movie alongside",
                                     {"first_actor": "Ada Lovelace"}, "Alan Turing")], folder / "examples.jsonl")
    (folder / "sweep.json").write_text(json.dumps({
        "name": "t", "models": [{"name": "tiny", "tiny": "llama"}], "data": {"examples": "examples.jsonl"},
        "grid": "main", "output": "runs/t"}))
    (folder / "runs" / "t").mkdir(parents=True)
    (folder / "runs" / "t" / "results.jsonl").write_text(results_text)


def _resume(results_text: str) -> None:
    from nngraft.study.sweep import load_sweep_config, run_sweep

    with _scratch_folder() as folder:
        _prepare_resume(folder, results_text)
        run_sweep(load_sweep_config("sweep.json"), show_progress=False)


def _resume_cut_off() -> None:
    from nngraft.study.results import TruncatedResultsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncatedResultsWarning)
        _resume(json.dumps(ROW) + "\n" + json.dumps(dict(ROW, spec="f")) + '\n{"model": "tiny", "sp')


def _resume_damaged() -> None:
    _resume(json.dumps(ROW) + "\nnot json\n" + json.dumps(dict(ROW, spec="f")) + "\n")


# -- 18: NDIF, mocked at the HTTP / websocket layer (tests/backends/test_ndif.py's FakeNDIF) --------

NDIF_HOST = "https://ndif.example"
NDIF_REPO = "nngraft-tests/tiny-llama"
NDIF_KEY = "key-123"


@lru_cache(maxsize=None)
def _hosted_folder() -> str:
    """P's config and tokenizer: what nnsight reads to build the (meta) model of a hosted repo."""
    P, _, tok = pair()
    folder = Path(tempfile.mkdtemp(prefix="nngraft-errors-")) / "tiny-llama"
    P.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _ndif(run: Callable[[str], object], *, key: str | None = NDIF_KEY, sent: int = 0, too_large: bool = False):
    """Call ``run(hosted_folder)`` with NDIF's HTTP and websocket endpoints mocked; check how many
    requests reached the network and that the key is not echoed, then re-raise the error."""
    import httpx
    import websocket
    from nnsight.modeling import huggingface
    from nnsight.schema.config import CONFIG

    from tests.helpers.ndif import FakeNDIF

    fake = FakeNDIF(None, NDIF_REPO, "llama", key=NDIF_KEY)  # never reaches its worker: all fail first
    if too_large:
        fake.reject_with = httpx.Response(413, text="Request Entity Too Large")
    folder = _hosted_folder()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ))
        os.environ.pop("NDIF_API_KEY", None)
        if key is not None:
            os.environ["NDIF_API_KEY"] = key
        stack.enter_context(mock.patch.object(CONFIG.API, "APIKEY", None))
        stack.enter_context(mock.patch.object(httpx, "get", fake.get))
        stack.enter_context(mock.patch.object(httpx, "Client", fake.client))
        stack.enter_context(mock.patch.object(websocket, "create_connection", fake.create_connection))
        stack.enter_context(mock.patch.dict(huggingface._ID_CACHE, {folder: NDIF_REPO, "meta-llama/Nope": "meta-llama/Nope"}))
        try:
            run(folder)
        except GraftError as error:
            assert len(fake.posted) == sent, f"{len(fake.posted)} requests were sent, expected {sent}"
            assert not key or key not in str(error), "the API key is echoed in the message"
            raise
    raise AssertionError("no error")


LT_MLP = spec(GraftRule(components=["mlp"], positions=[Last()]), name="lt_mlp")


def _ndif_run(folder: str, **kwargs) -> None:
    from nngraft.donors.delta import DenseDonor

    Grafter.remote(folder, DenseDonor(pair()[1]), host=NDIF_HOST, verbose=False, **kwargs).run(LT_MLP, ["Ada stars in"])


def _ndif_no_key():
    from nngraft.donors.delta import DenseDonor

    _ndif(lambda folder: Grafter.remote(folder, DenseDonor(pair()[1]), host=NDIF_HOST), key=None)


def _ndif_wrong_key():
    _ndif(_ndif_run, key="wrong-key-456", sent=1)


def _ndif_not_hosted():
    from nngraft.donors.delta import DenseDonor

    _ndif(lambda folder: Grafter.remote("meta-llama/Nope", DenseDonor(pair()[1]), host=NDIF_HOST))


def _ndif_over_limit():
    _ndif(lambda folder: _ndif_run(folder, max_payload_mb=0.01))


def _ndif_413():
    _ndif(_ndif_run, sent=1, too_large=True)


# -- 19 and on: bad files, values and outputs (each once gave a wrong result or a traceback) ---------


def _in_scratch(write: Callable[[Path], None], then: Callable[[], object]) -> Callable[[], object]:
    """Run ``then()`` in a fresh working folder after ``write(folder)`` (short, stable paths)."""
    def run():
        with _scratch_folder() as folder:
            write(folder)
            return then()
    return run


def _write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return write


def _load_facts(name: str = "facts.jsonl"):
    from nngraft.study.data import load_facts

    return lambda: load_facts(name)


def _deeper_donor():
    from nngraft.testing import perturbed_copy

    P, _, tok = pair()
    Grafter(P, perturbed_copy(tiny_model("llama", n_layers=3, vocab_size=len(tok))), tok)


def _nan_donor():
    P, F, tok = pair()
    broken = {k: v.clone() for k, v in F.named_parameters()}
    broken["model.layers.1.mlp.down_proj.weight"][0, :3] = float("nan")
    Grafter(P, TensorDonor(broken), tok).run(spec(MLP_LT), ["Ada stars in"])


def _meta_donor():
    P, _, tok = pair()
    with torch.device("meta"):
        F = tiny_model("llama", vocab_size=len(tok))
    Grafter(P, F, tok)


def _other_pretrained():
    from nngraft.donors.delta import DeltaDonor
    from nngraft.testing import perturbed_copy

    P, F, tok = pair()
    Grafter(P, DeltaDonor(F, perturbed_copy(P, seed=7)), tok)


def _sweep_config(**model) -> str:
    return json.dumps({"models": [{"name": "tiny", "tiny": "llama", **model}], "data": {"examples": "e.jsonl"},
                       "grid": "main"})


def _run_sweep(output: str | None = None):
    from nngraft.study.examples import TestExample
    from nngraft.study.sweep import load_sweep_config, run_sweep, save_examples_jsonl

    save_examples_jsonl([TestExample("f1", "s3", "Ada Lovelace stars in", {"first_actor": "Ada Lovelace"},
                                     "Alan")], "e.jsonl")
    return run_sweep(load_sweep_config("sweep.json"), output=output, show_progress=False)


def _locked_output():
    from nngraft.study.results import output_lock

    with output_lock("runs/t"):
        _run_sweep("runs/t")


def _full_disk():
    import errno

    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    with mock.patch.object(os, "fsync", fsync):
        _run_sweep("runs/t")


def _offline_hub_id():
    with _scratch_folder() as folder:
        (folder / "empty-model").mkdir()
        Grafter("empty-model", "empty-model")


def _long_prompt():
    grafter().run(spec(MLP_LT), [" ".join(["Ada"] * 200)])


def _foreign_token():
    from nngraft.testing import perturbed_copy, tiny_tokenizer

    P = tiny_model("gpt2", vocab_size=256)  # its tokenizer has 384 tokens
    Grafter(P, perturbed_copy(P), tiny_tokenizer("gpt2")).run(spec(MLP_LT), ["Ada Lovelace stars in a movie alongside"])


def _second_graft():
    import nnsight

    import nngraft

    model = nnsight.NNsight(pair()[0])
    compiled = grafter().compile(spec(MLP_LT), ["Ada stars in"])
    with model.trace(**compiled.inputs):
        nngraft.graft(model, compiled)
        nngraft.graft(model, compiled)


def _graft_in_another_models_trace():
    import nnsight

    import nngraft

    model = nnsight.NNsight(pair()[1])  # F: same type and depth, other weights
    compiled = grafter().compile(spec(MLP_LT), ["Ada stars in"])
    with model.trace(**compiled.inputs):
        nngraft.graft(model, compiled)


def _donor_of_another_rope_theta():
    from transformers import AutoModelForCausalLM

    P, F, tok = pair()
    config = P.config.to_dict()
    config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": 500.0}
    other = AutoModelForCausalLM.from_config(type(P.config).from_dict(config), attn_implementation="eager")
    other.load_state_dict(F.state_dict())
    Grafter(P, other.eval(), tok)


def _identity_guard():
    import copy

    P, F, tok = pair()
    F = copy.deepcopy(F)
    g = Grafter(P, F, tok)
    F.model.norm.variance_epsilon = 0.5  # a setting outside the config, changed after the config check
    g.run(GraftSpec(), ["Ada stars in"])


def _rows_without_a_manifest() -> None:
    from nngraft.study.sweep import load_sweep_config, run_sweep

    with _scratch_folder() as folder:
        _prepare_resume(folder, json.dumps(ROW) + "\n")
        run_sweep(load_sweep_config("sweep.json"), show_progress=False)


def _lora_folder(folder: Path, name: str = "adapter") -> Path:
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(pair()[0]), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"],
                                                                init_lora_weights=False))
    model.save_pretrained(folder / name)
    return folder / name


def _weights_without_adapter_config(folder: Path) -> None:
    (_lora_folder(folder, "my-adapter") / "adapter_config.json").unlink()
    Grafter(pair()[0], "my-adapter", pair()[2])


def _adapter_file_for_folder(folder: Path) -> None:
    from nngraft.donors.loading import resolve_model

    _lora_folder(folder, "my-adapter")
    resolve_model("my-adapter/adapter_config.json")


def _adapter_for_other_modules(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    from nngraft.donors.delta import LoraDonor

    adapter = _lora_folder(folder, "gpt2-adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_fc"]}))
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace("mlp.up_proj", "mlp.c_fc"): v for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    Grafter(pair()[0], LoraDonor("gpt2-adapter"), pair()[2])


def _not_gguf(folder: Path) -> None:
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    Grafter(pair()[0], "model.gguf", pair()[2])


def _gguf_of_another_architecture(folder: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter("rwkv.gguf", "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    Grafter(pair()[0], "rwkv.gguf", pair()[2])


def _answer_past_the_context() -> None:
    from nngraft.study.answer import answer_logprobs

    [prompt] = grafter().tokenize(["Ada stars in"])
    answer_logprobs(grafter(), [GraftSpec()], [prompt], [[5] * 200])


def _misspelt_template() -> None:
    from nngraft.study.data import make_facts, make_test_examples

    make_test_examples(make_facts("fake_movies_fake_actors", 1), "sentnce_3")


def _demo_out_not_a_demo(folder: Path) -> None:
    from nngraft.study.donor_commands import _demo_output  # what the command checks first

    (folder / "runs").mkdir()
    _demo_output(Path("runs"))


def _wrong_f_for_a_bundle(folder: Path) -> None:
    """A run of P and F saved as folders, bundled with F by reference; reproduced with another F."""
    from nngraft.study.bundle import make_bundle
    from nngraft.study.examples import TestExample
    from nngraft.study.reproduce import reproduce
    from nngraft.study.sweep import run_sweep, save_examples_jsonl
    from nngraft.study.sweep_config import SweepConfig
    from nngraft.testing import perturbed_copy

    P, F, tok = pair()
    for name, model in (("P", P), ("F", F), ("F2", perturbed_copy(P, seed=9))):
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    save_examples_jsonl([TestExample("f1", "s3", "Ada Lovelace stars in", {"first_actor": "Ada Lovelace"}, "Alan")],
                        "e.jsonl")
    run_sweep(SweepConfig.model_validate({"models": [{"name": "m", "recipient": "P", "donor": "F"}],
                                          "data": {"examples": "e.jsonl"}, "grid": "main"}), output="run",
              show_progress=False)
    make_bundle("run", "run.zip", pack_donor="never", show_progress=False)
    reproduce("run.zip", donor="F2", show_progress=False)


CASES = [
    Case(1, "malformed JSON spec", '`{"rules": [`',
         lambda: GraftSpec.from_json('{"rules": [', source="fe.json"), SpecError, r"invalid graft spec fe.json:\n  \(JSON\): Invalid JSON"),
    Case(2, "unknown field", '`{"rules": [], "colour": "red"}`',
         lambda: GraftSpec.from_json('{"rules": [], "colour": "red"}', source="fe.json"), SpecError, "colour: Extra inputs are not permitted"),
    Case(3, "unknown component", '`"components": ["gat"]`',
         lambda: GraftSpec.from_json('{"rules": [{"components": ["gat"], "positions": [{"last": true}]}]}', source="fe.json"),
         SpecError, r"rules\[0\].components\[0\]: Input should be 'embed'"),
    Case(4, "component the architecture lacks", "`gate` on GPT-2", _gpt2_gate, ComponentNotFoundError,
         r"spec 'gates' rules\[0\]: component 'gate' does not exist in 'gpt2' models .* graft 'up' and 'down'"),
    Case(5, "layer out of range", "`layers: [40]` on a 2-layer model",
         lambda: grafter().run(spec(GraftRule(components=["mlp"], layers=[40], positions=[Last()])), ["Ada stars in"]),
         LayerRangeError, r"rules\[0\].layers: layer 40 is out of range for a model with 2 layers"),
    Case(5, "empty layer group", "`first_eighth` on a 2-layer model",
         lambda: grafter().run(spec(GraftRule(components=["mlp"], layers="first_eighth", positions=[Last()])), ["Ada stars in"]),
         LayerRangeError, "selects no layer of a 2-layer model"),
    Case(6, "span name not given for a prompt", "spec uses `first_actor`, prompt 1 gives only `movie`",
         lambda: grafter().run(spec(GraftRule(components=["mlp"], positions=[Span(span="first_actor")])),
                               ["Ada stars in", "Bob stars in"], spans=[{"first_actor": "Ada"}, {"movie": "stars"}]),
         PositionError, r"prompt 1: the spec grafts at span 'first_actor', but no text was given for it \(spans given: movie\)"),
    Case(7, "span text not in the prompt", '`{"first_actor": "Zendaya"}` for "Ada stars in"',
         lambda: grafter().run(spec(GraftRule(components=["mlp"], positions=[Span(span="first_actor")])),
                               ["Ada stars in"], spans=[{"first_actor": "Zendaya"}]),
         SpanNotFoundError, r"prompt 0: span 'first_actor' = 'Zendaya' does not occur in the prompt 'Ada stars in'"),
    Case(8, "span covering part of a token", '`{"who": "Gra"}` where "Grace" is one token', _partial_token,
         SpanAlignmentWarning, r"span 'who' = 'Gra' cuts through a token; selected whole tokens \d+:'.*Grace'",
         handling="warning (the whole token is grafted); turn it into an error with `warnings.simplefilter('error', SpanAlignmentWarning)`"),
    Case(9, "position out of range for a short prompt", "`index: [40]` on a 4-token prompt",
         lambda: grafter().run(spec(GraftRule(components=["mlp"], positions=[Index(index=[40])])), ["Ada stars in"]),
         PositionError, r"prompt 0: position index 40 is out of range for a prompt of \d+ tokens"),
    Case(10, "donor of another architecture", "Llama P, GPT-2 F",
         lambda: Grafter(pair()[0], tiny_model("gpt2", vocab_size=len(pair()[2])), pair()[2]),
         DonorMismatchError, "recipient is a 'llama' model but the donor is 'gpt2'"),
    Case(10, "donor tensor of the wrong shape", "F's `up_proj` is 3×3", _shape_mismatch,
         DonorMismatchError, r"donor tensor 'model.layers.1.mlp.up_proj.weight' has shape \(3, 3\) but the recipient's has \(64, 32\)"),
    Case(11, "donor of a non-float dtype", "integer weights",
         lambda: Grafter(pair()[0], TensorDonor({k: v.long() for k, v in pair()[1].named_parameters()}), pair()[2]).run(
             spec(MLP_LT), ["Ada stars in"]),
         DonorMismatchError, "has non-float dtype torch.int64",
         handling="raised; float donors of another dtype or device (fp16, bf16, cuda) are cast to the recipient's"),
    Case(12, "unsupported architecture", "`model_type: mamba`", _unsupported, UnsupportedArchitectureError,
         r"no nngraft adapter for model_type 'mamba' \(known: .*gpt2.*\)\. Register one: nngraft.arch.register_adapter"),
    Case(13, "spec from a newer nngraft", '`"schema_version": "3"`',
         lambda: GraftSpec.from_json('{"schema_version": "3", "rules": []}', source="fe.json"), SpecError,
         "schema_version: Value error, this spec uses schema_version 3, written by a newer nngraft"),
    Case(14, "donor file missing a tensor", "checkpoint without layer 1's `up_proj`", _missing_tensor,
         DonorMismatchError, r"the donor \(f.safetensors\) has no tensor 'model.layers.1.mlp.up_proj.weight', which this graft needs"),
    Case(15, "conflicting rules", "`o` at the last token from donors `default` and `hybrid`", _two_donors, SpecError,
         r"spec 'clash': component 'o' at layer 0, token \d+ of row 0 is grafted from two donors \('default' and 'hybrid'\)",
         handling="raised for two donors; the same donor named twice is a union (grafted once), not an error"),
    Case(16, "empty prompt list", "`g.run(spec, [])`", lambda: grafter().run(spec(MLP_LT), []), PositionError,
         r"no prompts given \(the prompt list is empty\)",
         handling="raised; an empty *spec* (no rules) is valid: it is the plain recipient P"),
    Case(16, "tokenizer without offsets", "a slow tokenizer with spans", _no_offsets, PositionError,
         "cannot report character offsets; spans need a fast tokenizer"),
    Case(17, "results file cut off at the end, on resume", 'last line `{"model": "tiny", "sp` (a run killed mid-write)',
         _resume_cut_off, TruncatedResultsWarning,
         r"runs/t/results.jsonl: line 3: dropped an incomplete last line \(21 characters; the previous run was "
         r"probably killed mid-write\); its unit will be rerun",
         handling="warning; the cut line is dropped, the file truncated to its last complete line, and that row "
                  "recomputed (`load_results` drops it too, without changing the file)"),
    Case(17, "results file damaged in the middle, on resume", "line 2 is `not json`", _resume_damaged, ResultsError,
         r"runs/t/results.jsonl: line 2 is not a JSON object \(Expecting value.*\); the file is damaged in the "
         r"middle, not just at the end. Nothing was changed: delete that line",
         handling="raised before any model is loaded; the file is left as it was (also by `load_results`)"),
    Case(18, "NDIF API key missing", "no `NDIF_API_KEY`, no `nnsight login`", _ndif_no_key, RemoteAuthError,
         r"no NDIF API key: set the NDIF_API_KEY environment variable \(or run `nnsight login`",
         handling="raised before anything is sent"),
    Case(18, "NDIF API key refused", "HTTP 401 from NDIF", _ndif_wrong_key, RemoteAuthError,
         r"NDIF \(https://ndif.example\) refused the request \(HTTP 401\).*Check NDIF_API_KEY",
         handling="raised; the key is never echoed"),
    Case(18, "model not hosted on NDIF", "`Grafter.remote(\"meta-llama/Nope\", ...)`", _ndif_not_hosted,
         ModelNotAvailableError, r"'meta-llama/Nope' is not running on NDIF \(https://ndif.example\). Running now: "
         r"nngraft-tests/tiny-llama",
         handling="raised before anything is sent (NDIF's /status is read first)"),
    Case(18, "request over the payload limit", "dense MLP graft, `max_payload_mb=0.01`", _ndif_over_limit,
         PayloadTooLargeError, r"this request would send 24.6 kB .* over the limit of 10.0 kB. Send less: a DeltaDonor",
         handling="raised before anything is sent (estimated from tensor shapes); default limit 256 MB"),
    Case(18, "NDIF refuses the payload size", "HTTP 413 from NDIF", _ndif_413, PayloadTooLargeError,
         r"NDIF \(https://ndif.example\) refused the request as too large for the server \(HTTP 413\): "
         r"Failed to send request: Request Entity Too Large. The request was \d+\.\d kB as sent \(\d+\.\d kB before "
         r"compression\). Send less per request: a smaller batch_size=.*see docs/remote.md",
         handling="raised after sending (the server's limit); lower `max_payload_mb` to refuse such "
                  "requests before sending. The message gives the request's sizes (SENT and RAW here: they "
                  "vary slightly from run to run, as torch writes storage addresses and temp paths into it)",
         shown=lambda text: re.sub(r"was [\d.]+ [kMG]?B as sent \([\d.]+ [kMG]?B before",
                                   "was SENT as sent (RAW before", text)),
    Case(19, "a key given twice in a JSON object", '`{"rules": [...], "rules": []}`',
         lambda: GraftSpec.from_json('{"rules": [{"components": ["mlp"], "positions": [{"last": true}]}],\n'
                                     ' "rules": []}', source="fe.json"), SpecError,
         r"invalid graft spec fe.json: the key 'rules' occurs twice in one JSON object \(line 2\)",
         handling="raised for specs, sweep configs, facts and examples files (plain JSON would keep the last "
                  "value silently)"),
    Case(20, "file that is not UTF-8", "a spec saved as latin-1",
         _in_scratch(_write("fe.json", '{"name": "café", "rules": []}'.encode("latin-1")),
                     lambda: GraftSpec.load("fe.json")), SpecError,
         r"spec file fe.json is not UTF-8 text \(byte 0xe9 on line 1", handling="raised (any file nngraft reads)"),
    Case(20, "file in UTF-16", "a facts file saved as UTF-16",
         _in_scratch(_write("facts.jsonl", '{"first_actor": "Ada"}\n'.encode("utf-16")), _load_facts()),
         DataError, "facts file facts.jsonl is encoded as UTF-16; nngraft reads UTF-8 text"),
    Case(20, "a directory where a file is expected", "`--spec runs/`",
         _in_scratch(lambda folder: (folder / "runs").mkdir(), lambda: GraftSpec.load("runs")), SpecError,
         "cannot read spec file runs: it is a directory; give the path of a file"),
    Case(21, "fact field that is not text", '`"second_actor": null` or a list',
         _in_scratch(_write("facts.jsonl", '{"first_actor": "Marie Curie", "second_actor": ["Pierre", "Irène"]}\n'),
                     _load_facts()), DataError,
         r"facts.jsonl, line 1: field 'second_actor' is a list .* must be a string or a number",
         handling="raised before any model is loaded (it would be scored as the text \"['Pierre', 'Irène']\")"),
    Case(22, "donor deeper than the recipient", "P with 2 layers, F with 3", _deeper_donor, DonorMismatchError,
         "the recipient has depth num_hidden_layers=2 but the donor has num_hidden_layers=3",
         handling="raised; P's and F's configs (depth, widths, heads, vocabulary, type) and parameters are "
                  "compared in both directions"),
    Case(22, "donor weights that are NaN", "a diverged finetune", _nan_donor, DonorMismatchError,
         r"donor tensor 'model.layers.1.mlp.down_proj.weight' holds 3 NaN or infinite value\(s\)",
         handling="raised when the tensor is first grafted"),
    Case(22, "donor on the meta device", "F built under `torch.device('meta')`", _meta_donor, DonorMismatchError,
         r"the donor's parameter 'model.embed_tokens.weight' is on the meta device \(no weights loaded\)"),
    Case(23, "delta donor made from another P", "`DeltaDonor(F, pretrained=X)`, X not the run's P",
         _other_pretrained, DonorMismatchError,
         r"this DeltaDonor was made from another pretrained model than the recipient: tensor "
         r"'model.embed_tokens.weight' differs \(pretrained fingerprint [0-9a-f]{12}",
         handling="raised: every tensor of P is compared with the recipient's (and its fingerprint kept in "
                  "`donor.pretrained_fingerprints`)"),
    Case(24, "bad argument value", "`g.generate(spec, prompts, max_new_tokens=0)`",
         lambda: grafter().generate(spec(MLP_LT), ["Ada stars in"], max_new_tokens=0), ArgumentError,
         r"Grafter.generate: max_new_tokens: Input should be an integer >= 1, got 0 \(int\)",
         handling="raised for every argument of Grafter, run, run_grid, generate and the donors: the message "
                  "names the argument and the value received"),
    Case(24, "spans of the wrong shape", "`spans={'first_actor': 'Ada'}` for two prompts",
         lambda: grafter().run(spec(MLP_LT), ["Ada stars in", "Bob stars in"], spans={"first_actor": "Ada"}),
         ArgumentError, r"Grafter.run: spans: Input should be a list with one \{span name: text\} dict per prompt"),
    Case(24, "span text of the wrong type", "`spans=[{'first_actor': 3}]`",
         lambda: grafter().run(spec(MLP_LT), ["Ada stars in"], spans=[{"first_actor": 3}]), ArgumentError,
         r"Grafter.run: spans\[0\]\['first_actor'\]: Input should be the span's text"),
    Case(24, "bad remote setting", "`Grafter.remote(..., max_payload_mb=0)`",
         lambda: __import__("nngraft.backends.ndif", fromlist=["NdifBackend"]).NdifBackend(max_payload_mb=0),
         ArgumentError, r"NdifBackend: max_payload_mb: Input should be a finite number > 0 or None, got 0 \(int\)",
         handling="raised before anything loads or is sent, for every setting of `Grafter.remote` / `NdifBackend` "
                  "(`execution`, `dtype`, `host`, `api_key` — whose value is never shown —, `revision`, "
                  "`check_model`, `verbose`) and a bad `NNGRAFT_MAX_PAYLOAD_MB`"),
    Case(25, "prompt longer than the context", "a 200-token prompt, a 128-token model", _long_prompt, PromptError,
         r"prompt 0 has \d+ tokens, more than the model's context of 128 \(max_position_embeddings\)"),
    Case(25, "token id beyond the vocabulary", "another model's tokenizer", _foreign_token, PromptError,
         r"prompt 0: token id \d+ is outside the model's vocabulary of 256 tokens"),
    Case(26, "model that cannot be loaded", "an empty folder, or a hub id not in the cache while offline",
         _offline_hub_id, ModelLoadError, r"empty-model is a folder but not a Hugging Face model folder "
         r"\(no config.json\) nor a PEFT adapter \(no adapter_config.json\)",
         handling="raised (nngraft never downloads at run time; also in `nngraft payload`)",
         shown=lambda text: re.sub(r" \((OSError|ValueError): .*\)\. Give", " (…). Give", text)),
    Case(27, "bad value in a sweep config", '`"tiny": "mamba"`',
         _in_scratch(_write("sweep.json", _sweep_config(tiny="mamba")), lambda: _run_sweep()), SweepConfigError,
         r"models\[0\].tiny: Value error, no tiny model of type 'mamba'",
         handling="raised before anything runs; likewise `tiny_layers` out of 1…64, an unknown `device`, and "
                  "`batch_size` 0, negative or fractional"),
    Case(27, "GPU device without a GPU", '`"device": "cuda:7"` on a CPU machine',
         _in_scratch(_write("sweep.json", _sweep_config(device="cuda:7")), lambda: _run_sweep()), GraftError,
         r"--device cuda:7: this (torch build has no usable CUDA GPU|machine has \d+ CUDA device\(s\)).*; use "
         r"--device cpu or auto",
         shown=lambda text: re.sub(r"this (torch build has no usable CUDA GPU \(torch [^)]*\)|machine has .*?\)); "
                                   r"use --device cpu or auto.*",
                                   "this torch build has no usable CUDA GPU (torch VERSION); use --device cpu or auto",
                                   text)),
    Case(28, "output that is someone else's file", "`nngraft run ... -o notes.txt`",
         _in_scratch(lambda folder: (_write("notes.txt", "my notes\n")(folder), _write("sweep.json", _sweep_config())(folder)),
                     lambda: _run_sweep("notes.txt")), ResultsError,
         "refusing to write results into notes.txt: it is not an nngraft results file",
         handling="raised before anything is written: the file is left as it was and no manifest is written "
                  "beside it (likewise for a sweep's `output`, and a `manifest.json` that is not nngraft's)"),
    Case(28, "output folder holding other files", "`nngraft plot runs/t -o mine/` where mine/ holds notes.txt",
         _in_scratch(lambda folder: (_write("results.jsonl", json.dumps(dict(ROW, template="s3", fact_id="f1")) + "\n")(
             folder), (folder / "mine").mkdir(), _write("mine/notes.txt", "my notes\n")(folder)),
             lambda: __import__("nngraft.study.plot", fromlist=["plot_results"]).plot_results(".", "mine")),
         OutputExistsError, r"refusing to write into mine: it holds files that `nngraft plot` did not write \(notes.txt\)",
         handling="raised before anything is written, likewise by `localize -o` and `demo --out`; a new or empty folder, "
                  "or one the same command wrote (marked by `.nngraft-output`), is fine, and a rerun replaces its "
                  "own files. `finetune --out … --overwrite` replaces only a folder finetune wrote"),
    Case(28, "output file that is someone else's", "`nngraft data make … -o notes.txt`",
         _in_scratch(_write("notes.txt", "my notes\n"), lambda: __import__("nngraft.study.data", fromlist=["x"]).save_facts(
             __import__("nngraft.study.data", fromlist=["x"]).make_facts("fake_movies_fake_actors", 2), "notes.txt")),
         OutputExistsError, "refusing to overwrite notes.txt: it exists and is not a file `nngraft data make` wrote",
         handling="raised before anything is written, likewise by `data texts -o` and `schema -o`; a rerun over "
                  "the command's own output replaces it"),
    Case(29, "two runs on one output folder", "a second `nngraft sweep` while the first runs",
         _in_scratch(_write("sweep.json", _sweep_config()), _locked_output), OutputInUseError,
         r"runs/t is in use by another nngraft run \(pid \d+ on .*, started .*\)\. Two runs writing one results file",
         handling="raised: the output folder is locked (an OS file lock, released even when a run crashes); "
                  "`plot -o`, `localize -o` and `demo --out` take the same lock",
         shown=lambda text: re.sub(r"\(pid .*?\)\. Two", "(pid PID on HOST, started TIME: COMMAND). Two", text)),
    Case(30, "full disk", "ENOSPC while appending results", _in_scratch(_write("sweep.json", _sweep_config()), _full_disk),
         OSError, "No space left on device", cli=True,
         handling="the command line exits with code 2 and this message (no traceback; `--debug` shows it); "
                  "likewise for permissions"),
    Case(31, "graft outside a trace", "`nngraft.graft(model, compiled)` with no trace open", _graft_outside_trace,
         TraceError, r"nngraft.graft\(model, compiled\) must be called inside an open trace of the model"),
    Case(31, "graft after the trace touched a module", "`nngraft.graft` after reading `embed_tokens.output`",
         _graft_after_a_read, TraceError, "nngraft.graft must be called first in the trace, before reading or "
         "modifying any module"),
    Case(31, "graft on other inputs", "compiled for 2 prompts, traced on 1", _graft_on_other_inputs, ValueError,
         r"graft: the trace runs input_ids of shape \(1, 4\), but the graft was compiled for other input_ids "
         r"\(shape \(2, 5\), left-padded as nngraft tokenizes\); open the trace with model.trace\(\*\*compiled.inputs\)",
         handling="raised inside the trace, before any module is grafted (a ValueError: the check also runs on "
                  "NDIF, where nngraft's error classes do not exist)"),
    Case(31, "logit difference without a foil", "`result.logit_diff(\"Alan\")`",
         lambda: grafter().run(spec(MLP_LT), ["Ada stars in"]).logit_diff("Alan"), ValueError,
         r"logit_diff needs foils= \(answers to compare with\) or baseline= \(P's result on the same prompts"),
    Case(32, "a second graft in one trace", "`nngraft.graft` twice, or inside `g.trace(...)`", _second_graft,
         TraceError, "this trace already has a graft", handling="raised (it used to be dropped silently)"),
    Case(32, "a graft in another model's trace", "compiled on P, applied in a trace of F", _graft_in_another_models_trace,
         TraceError, r"the graft was compiled for another model than the one traced",
         handling="raised unless the traced model holds P's weights (P loaded twice is accepted)"),
    Case(32, "donor that computes differently", "F with another `rope_theta` (same shapes)", _donor_of_another_rope_theta,
         DonorMismatchError, r"rope_parameters.rope_theta=10000.0 but the donor has rope_parameters.rope_theta=500.0",
         handling="raised for every door (object, folder, .safetensors, Dense/DeltaDonor, LoRA base, CLI); the "
                  "entries compared are `nngraft.arch.COMPUTATION_CONFIG_KEYS`"),
    Case(32, "identity guard", "F's final norm epsilon changed outside its config", _identity_guard,
         IdentityCheckError, r"grafting everything does not reproduce F .* model.norm.variance_epsilon: P 1e-06, F 0.5",
         handling="raised on a Grafter's first run (exit code 1 from the CLI); `check_identities=False` or "
                  "`NNGRAFT_IDENTITY_CHECK=0` switches it off",
         shown=lambda m: re.sub(r"max \|Δ log-prob\| [0-9.e+-]+", "max |Δ log-prob| …", m)),
    Case(32, "empty answer", "`result.target_prob(\"\")`",
         lambda: grafter().run(spec(MLP_LT), ["Ada stars in"]).target_prob(""), ArgumentError,
         r"GraftResult: targets\[0\]: Input should be a non-empty answer", handling="raised (also target_rank, "
         "logit_diff's foils); it used to score the bare space token"),
    Case(32, "KL of logits that are no distribution", "`kl_divergence` with a row of NaN or all −inf logits",
         lambda: __import__("nngraft.result", fromlist=["kl_divergence"]).kl_divergence(
             torch.full((1, 3), float("-inf")), torch.zeros(1, 3)), ValueError,
         r"KL: row 0 of p's logits is not a distribution", handling="raised; a −inf logit in an otherwise "
         "valid row contributes 0 (0 · log 0), and mass where the other has none gives +inf"),
    Case(32, "rows no manifest vouches for", "results.jsonl whose manifest.json was deleted", _rows_without_a_manifest,
         ResultsError, r"holds 1 rows for model 'tiny', but there is no manifest beside it",
         handling="raised before anything is written; a run cannot tell which model made those rows"),
    Case(33, "forced token outside the vocabulary", "`g.generate(spec, prompts, forced=[[99999]])`",
         lambda: grafter().generate(GraftSpec(), ["Ada stars in"], forced=[[99999]]), ArgumentError,
         r"forced\[0\]\[0\]: token id 99999 is outside the model's vocabulary of \d+ tokens",
         handling="raised (it decoded to '', or raised OverflowError for a negative id); an empty forced row too"),
    Case(33, "answer longer than the context", "`--answer-logprob` with a 200-token answer (context 128)",
         _answer_past_the_context, PromptError, r"answer 0 has 200 tokens: after its prompt's \d+, more than the "
         r"model's context of 128", handling="raised before any pass (it was scored at positions the model never "
                                             "saw); the same check guards `generate`/`decode`"),
    Case(33, "misspelt template name", "`--template sentnce_3`", _misspelt_template, DataError,
         r"unknown test template 'sentnce_3' \(did you mean 'sentence_3'\?\)",
         handling="raised with the closest name (the CLI said \"no template file at sentnce_3\")"),
    Case(33, "a file that is not GGUF", "`--model model.gguf` holding other bytes", _in_scratch(_not_gguf, lambda: None),
         ModelLoadError, r"model.gguf is not a GGUF model file transformers can read",
         handling="raised (a bare ValueError in Python; the CLI advised a hub id)"),
    Case(33, "GGUF of another architecture", "a GGUF file of `rwkv6`", _in_scratch(_gguf_of_another_architecture, lambda: None),
         ModelLoadError, r"rwkv.gguf: GGUF model with architecture rwkv6 is not supported yet. transformers converts",
         handling="raised with the architectures this transformers converts",
         shown=lambda m: re.sub(r"architectures: [a-z0-9_, ]+;", "architectures: bloom, falcon, gemma2, gpt2, llama, "
                                                                  "… (from transformers' table);", m)),
    Case(33, "adapter weights without adapter_config.json", "a folder holding only adapter_model.safetensors",
         _in_scratch(_weights_without_adapter_config, lambda: None), ModelLoadError,
         r"my-adapter holds LoRA adapter weights but no adapter_config.json", handling="raised (it said the "
         "folder was neither a model nor an adapter)"),
    Case(33, "a file of an adapter or model for its folder", "`--donor my-adapter/adapter_config.json`",
         _in_scratch(_adapter_file_for_folder, lambda: None), ModelLoadError,
         r"my-adapter/adapter_config.json is one file of a saved model or adapter: give its folder, my-adapter"),
    Case(33, "adapter for modules P lacks", "a LoRA adapter of GPT-2's `c_fc` on a Llama",
         _in_scratch(_adapter_for_other_modules, lambda: None), DonorMismatchError,
         r"the LoRA adapter gpt2-adapter adapts module 'model.layers.0.mlp.c_fc', which LlamaForCausalLM does not have",
         handling="raised by Grafter, Grafter.remote and `nngraft payload` (which said \"0 modules, fits\")"),
    Case(33, "--demo-out that is no demo output", "`nngraft donor compress F P ... --demo-out runs`",
         _in_scratch(_demo_out_not_a_demo, lambda: None), ArgumentError, r"--demo-out runs: not a `nngraft demo` output folder",
         handling="raised before loading models or the SVD (it failed after them on a missing file)", cli=True),
    Case(34, "bundling a folder that is no run", "`nngraft bundle notes`",
         _in_scratch(lambda folder: (folder / "notes").mkdir(), lambda: __import__(
             "nngraft.study.bundle", fromlist=["make_bundle"]).make_bundle("notes", show_progress=False)),
         BundleError, r"notes is not a run folder: it has no results.jsonl and no manifest.json",
         handling="raised before anything is written"),
    Case(34, "a file that is no bundle", "`nngraft reproduce notes.zip` holding other bytes",
         _in_scratch(_write("notes.zip", "not a bundle"), lambda: __import__(
             "nngraft.study.bundle", fromlist=["open_bundle"]).open_bundle("notes.zip", "out")),
         BundleError, r"notes.zip is neither a zip nor a tar file: not a bundle nngraft bundle made"),
    Case(34, "reproducing with another F", "`nngraft reproduce run.zip --donor F2` (F2 is not the run's F)",
         _in_scratch(_wrong_f_for_a_bundle, lambda: None), FingerprintMismatchError,
         r"F of model 'm' \(.*F2\) is not the model this run used: its weights fingerprint is [0-9a-f]{16}…, the "
         r"bundle records [0-9a-f]{16}…",
         handling="raised after loading, before any row is computed; a LoRA F is checked by its adapter's tensors",
         shown=lambda m: re.sub(r"[0-9a-f]{16}…", "…", re.sub(r"/\S*/(F2?)\b", r"\1", m))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.number}-{c.title}")
def test_error(case: Case):
    P = pair()[0]
    before = {n: p.clone() for n, p in P.named_parameters()}
    with pytest.raises(case.error, match=case.match):
        case.run()
    assert all(torch.equal(before[n], p) for n, p in P.named_parameters()), "an error left modified weights behind"


def test_same_donor_twice_is_a_union():
    g = grafter()
    once = g.run(spec(GraftRule(components=["o"], positions=[Last()])), ["Ada stars in"]).logits
    twice = g.run(spec(GraftRule(components=["o"], positions=[Last()]),
                       GraftRule(components=["o", "mlp"], layers=[0], positions=[Index(index=[-1])])), ["Ada stars in"]).logits
    with_mlp = g.run(spec(GraftRule(components=["o"], positions=[Last()]),
                          GraftRule(components=["mlp"], layers=[0], positions=[Last()])), ["Ada stars in"]).logits
    torch.testing.assert_close(twice, with_mlp, rtol=0, atol=0)
    assert not torch.equal(once, with_mlp)


def test_empty_spec_is_plain_recipient():
    P, _, tok = pair()
    with torch.no_grad():
        plain = P(torch.tensor([tok("Ada stars in")["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(grafter().run(GraftSpec(), ["Ada stars in"]).logits[0], plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["cut off", "damaged"])
def test_refused_resume_leaves_the_results_file_as_it_was(damage):
    """Item 17: an error on resume writes nothing (no manifest, no temp file, no repair), and
    ``load_results`` reads without changing the file."""
    from nngraft.study.results import load_results
    from nngraft.study.sweep import load_sweep_config, run_sweep

    good = json.dumps(ROW) + "\n"
    text = good + ('{"model": "tiny", "sp' if damage == "cut off" else "not json\n" + good.replace('"p"', '"f"'))
    with _scratch_folder() as folder:
        _prepare_resume(folder, text)
        results = folder / "runs" / "t" / "results.jsonl"
        with warnings.catch_warnings():
            warnings.simplefilter("error", TruncatedResultsWarning)
            with pytest.raises((ResultsError, TruncatedResultsWarning), match="runs/t/results.jsonl: line [23]"):
                run_sweep(load_sweep_config("sweep.json"), show_progress=False)
        if damage == "cut off":
            with pytest.warns(TruncatedResultsWarning, match="line 2: dropped an incomplete last line"):
                assert load_results(results) == [ROW]
        else:
            with pytest.raises(ResultsError, match="line 2 is not a JSON object"):
                load_results(results)
        assert results.read_text() == text
        assert [p.name for p in results.parent.iterdir()] == ["results.jsonl"]


def message(case: Case) -> str:
    from nngraft.cli.boundary import user_error_message

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            case.run()
    except case.error as error:
        return user_error_message(error) if case.cli else str(error)
    raise AssertionError(f"case {case.title} raised nothing")


def render() -> str:
    lines = [
        "# Errors",
        "",
        "Every bad input stops with an error that says what is wrong and, where possible, what to do.",
        "All errors derive from `nngraft.GraftError` (spec problems from `SpecError`, which is also a",
        "`ValueError`). No error leaves a half-written file or a model with modified weights behind:",
        "files are written to a temp file and renamed, and donor weights are only swapped in for the",
        "duration of each donor call. On the command line, every error here ends `nngraft` with exit",
        "code 2 and its message, without a traceback (`nngraft --debug ...` shows it); only a bug in",
        "nngraft shows a traceback. Generated from `tests/test_errors.py`, which checks each row.",
        "",
        "| # | input | example | error | handling | message |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        text = message(case)
        text = (case.shown(text) if case.shown else text).replace("\n", "<br>").replace("|", "\\|")
        lines.append(f"| {case.number} | {case.title} | {case.given} | `{case.error.__name__}` | {case.handling} | {text} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current():
    assert DOC.read_text() == render(), "regenerate with: python -m tests.test_errors"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
