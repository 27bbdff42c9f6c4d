"""nngraft.util.checks: each validator accepts its edge and refuses just past it (written against
the planted mutants of benchmarks/mutate_validators.py: a flipped comparison or a dropped check
fails here)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from nngraft.errors import ArgumentError
from nngraft.util import checks

INF, NAN = float("inf"), float("nan")


def test_positive_int_takes_its_minimum_and_refuses_below_and_non_integers():
    assert checks.positive_int("f", "n", 1) == 1
    assert checks.positive_int("f", "n", 0, minimum=0) == 0
    assert checks.positive_int("f", "n", None, optional=True) is None
    for bad in (0, -3, 1.0, "2", True, None):
        with pytest.raises(ArgumentError, match=r"f: n: Input should be an integer >= 1, got"):
            checks.positive_int("f", "n", bad)
    with pytest.raises(ArgumentError, match=r"an integer >= 3 or None, got 2"):
        checks.positive_int("f", "n", 2, minimum=3, optional=True)


def test_is_int_is_not_fooled_by_bools():
    assert checks.is_int(3) and checks.is_int(torch.tensor(3).item())
    assert not checks.is_int(True) and not checks.is_int(3.0)


def test_number_takes_its_minimum_and_refuses_below_nan_and_inf():
    assert checks.number("f", "x", 0.0) == 0.0 and checks.number("f", "x", 2, minimum=2) == 2
    for bad in (-0.5, NAN, INF, -INF, True, "1"):
        with pytest.raises(ArgumentError, match=r"a finite number >= 0"):
            checks.number("f", "x", bad)


def test_positive_number_refuses_zero_nan_and_inf():
    assert checks.positive_number("f", "x", 1e-9) == 1e-9
    for bad in (0, 0.0, -1, NAN, INF, False):
        with pytest.raises(ArgumentError, match=r"a finite number > 0"):
            checks.positive_number("f", "x", bad)


def test_text_refuses_empty_and_blank_padded_and_urls_without_a_scheme():
    assert checks.text("f", "s", "ok") == "ok"
    assert checks.text("f", "u", "https://x.org", url=True) == "https://x.org"
    for bad in ("", " ok", "ok\n", 3):
        with pytest.raises(ArgumentError, match="a non-empty string"):
            checks.text("f", "s", bad)
    with pytest.raises(ArgumentError, match="an http:// or https:// URL"):
        checks.text("f", "u", "ndif.us", url=True)


def test_float_dtype_refuses_integer_dtypes():
    assert checks.float_dtype("f", "d", torch.bfloat16) is torch.bfloat16 and checks.float_dtype("f", "d", None) is None
    for bad in (torch.int64, torch.bool, "float32"):
        with pytest.raises(ArgumentError, match="a floating torch dtype"):
            checks.float_dtype("f", "d", bad)


def test_argparse_types_take_their_edge_and_refuse_just_past_it():
    assert checks.positive_int_arg("1") == 1 and checks.seed_arg("0") == 0
    assert checks.positive_number_arg("1e-9") == 1e-9 and checks.non_negative_number_arg("0") == 0.0
    cases = [(checks.positive_int_arg, "0", "should be an integer >= 1, got 0"),
             (checks.positive_int_arg, "x", "should be an integer >= 1, got 'x'"),
             (checks.seed_arg, "-1", r"should be an integer >= 0, got -1 \(a negative seed draws the same data as 1\)"),
             (checks.positive_number_arg, "0", "should be a number > 0, got 0"),
             (checks.positive_number_arg, "inf", "should be a number > 0, got inf"),
             (checks.positive_number_arg, "nan", "should be a number > 0, got nan"),
             (checks.non_negative_number_arg, "-0.1", "should be a number >= 0, got -0.1"),
             (checks.non_negative_number_arg, "inf", "should be a number >= 0, got inf")]
    for parse, text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_flag_takes_only_true_and_false():
    assert checks.flag("f", "b", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(ArgumentError, match="f: b: Input should be True or False"):
            checks.flag("f", "b", bad)


def test_prompts_refuse_empty_strings_and_non_strings():
    assert checks.prompts("f", "one") == ["one"] and checks.prompts("f", ("a", "b")) == ["a", "b"]
    with pytest.raises(ArgumentError, match=r"prompts\[1\]: Input should be a non-empty string"):
        checks.prompts("f", ["a", ""])
    with pytest.raises(ArgumentError, match=r"prompts\[0\]: Input should be a string"):
        checks.prompts("f", [3])
    with pytest.raises(ArgumentError, match="prompts: Input should be a string or a list of strings"):
        checks.prompts("f", b"bytes")


def test_spans_need_one_dict_per_prompt_with_non_empty_texts():
    assert checks.spans("f", {"a": "x"}, 1) == [{"a": "x"}]
    assert checks.spans("f", [{"a": (0, 2)}, None], 2) == [{"a": (0, 2)}, None]
    for value, n in (([{"a": "x"}], 2), ([{"a": "x"}] * 3, 2)):
        with pytest.raises(ArgumentError, match=r"spans: Input should have one dict per prompt \(2\), got"):
            checks.spans("f", value, n)
    with pytest.raises(ArgumentError, match=r"spans\[0\]\['a'\]: Input should be a non-empty text"):
        checks.spans("f", [{"a": ""}], 1)
    with pytest.raises(ArgumentError, match=r"spans\[0\] key: Input should be a non-empty string"):
        checks.spans("f", [{"": "x"}], 1)
    with pytest.raises(ArgumentError, match=r"spans\[0\]\['a'\]: Input should be the span's text"):
        checks.spans("f", [{"a": (0, 1, 2)}], 1)


def test_a_number_from_the_environment_must_be_positive_and_finite(monkeypatch):
    read = lambda: checks.positive_from_environment("f", "NNGRAFT_X", 5.0, "MB", "max_x")  # noqa: E731
    assert read() == 5.0
    monkeypatch.setenv("NNGRAFT_X", "0.5")
    assert read() == 0.5
    for bad in ("0", "-1", "inf", "nan", "lots"):
        monkeypatch.setenv("NNGRAFT_X", bad)
        with pytest.raises(ArgumentError, match=r"the environment variable NNGRAFT_X should be a number of MB > 0, got "
                                                r".*; fix or unset it, or pass max_x="):
            read()
    assert math.isfinite(5.0)
