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
from nngraft.errors import GraftError, ModelNotAvailableError, PayloadTooLargeError, RemoteAuthError
from nngraft.study.results import ResultsError, TruncatedResultsWarning
from nngraft.testing import tiny_model, tiny_pair

DOC = Path(__file__).parents[1] / "docs" / "errors.md"


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

    from nngraft.tokens import tokenize_prompt

    tokenize_prompt(SlowTokenizer(), "Ada stars", {"first_actor": "Ada"})


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


# -- 18: NDIF, mocked at the HTTP / websocket layer (tests/test_backends_ndif.py's FakeNDIF) --------

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

    from tests.test_backends_ndif import FakeNDIF

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
    from nngraft.delta import DenseDonor

    Grafter.remote(folder, DenseDonor(pair()[1]), host=NDIF_HOST, verbose=False, **kwargs).run(LT_MLP, ["Ada stars in"])


def _ndif_no_key():
    from nngraft.delta import DenseDonor

    _ndif(lambda folder: Grafter.remote(folder, DenseDonor(pair()[1]), host=NDIF_HOST), key=None)


def _ndif_wrong_key():
    _ndif(_ndif_run, key="wrong-key-456", sent=1)


def _ndif_not_hosted():
    from nngraft.delta import DenseDonor

    _ndif(lambda folder: Grafter.remote("meta-llama/Nope", DenseDonor(pair()[1]), host=NDIF_HOST))


def _ndif_over_limit():
    _ndif(lambda folder: _ndif_run(folder, max_payload_mb=0.01))


def _ndif_413():
    _ndif(_ndif_run, sent=1, too_large=True)


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
    Case(13, "spec from a newer nngraft", '`"schema_version": "2"`',
         lambda: GraftSpec.from_json('{"schema_version": "2", "rules": []}', source="fe.json"), SpecError,
         "schema_version: Value error, this spec uses schema_version 2, written by a newer nngraft"),
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            case.run()
    except case.error as error:
        return str(error)
    raise AssertionError(f"case {case.title} raised nothing")


def render() -> str:
    lines = [
        "# Errors",
        "",
        "Every bad input stops with an error that says what is wrong and, where possible, what to do.",
        "All errors derive from `nngraft.GraftError` (spec problems from `SpecError`, which is also a",
        "`ValueError`). No error leaves a half-written file or a model with modified weights behind:",
        "files are written to a temp file and renamed, and donor weights are only swapped in for the",
        "duration of each donor call. Generated from `tests/test_errors.py`, which checks each row.",
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
