"""Every bad input gets a clear error: its type, and a message that names the problem.

The cases here are also the source of docs/errors.md: run ``python -m tests.test_errors`` to
regenerate it from the real messages (a test fails when the page is out of date).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

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
        text = message(case).replace("\n", "<br>").replace("|", "\\|")
        lines.append(f"| {case.number} | {case.title} | {case.given} | `{case.error.__name__}` | {case.handling} | {text} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current():
    assert DOC.read_text() == render(), "regenerate with: python -m tests.test_errors"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
