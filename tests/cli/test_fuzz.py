"""Fuzzing the command line with bad files: every run ends in success or a clean user error.

Hypothesis feeds random and mutated specs, facts files, examples files and sweep configs — broken
bytes, other encodings (latin-1, UTF-16, UTF-32, a BOM), wrong types, deep nesting, huge values,
duplicate keys — through ``nngraft.cli.main`` in-process, and checks each run:

- it returns 0, or ends with exit code 2 and one ``error:`` / ``usage`` message; any other
  exception (a traceback) fails the test;
- an existing results folder (``keep/``, from a real earlier run) is unchanged byte for byte after
  an error, and only appended to after a success.

Each example is cheap (tiny models, built once and copied), so a few hundred run in about a
minute. ``NNGRAFT_FUZZ_EXAMPLES`` sets how many (default 300); ``NNGRAFT_FUZZ_RANDOM=1`` draws new
random examples instead of the fixed, reproducible sequence CI runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nngraft.cli import main  # noqa: E402

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("NNGRAFT_FUZZ_EXAMPLES", "300"))

SPEC = {"schema_version": "1", "name": "fe_lt", "rules": [
    {"components": ["mlp", "o"], "layers": "all", "positions": [{"span": "first_actor"}, {"last": True}]}]}
SPEC_SIMPLE = {"name": "lt", "rules": [{"components": ["up"], "layers": [0, -1], "positions": [{"index": [-1]}]}]}
FACTS = [{"id": "f1", "first_actor": "Ada Lovelace", "second_actor": "Alan Turing", "movie_title": "The Engine"},
         {"id": "f2", "first_actor": "Grace Hopper", "second_actor": "Marie Curie", "movie_title": "Compiler"}]
EXAMPLE_ROWS = [{"fact_id": "f1", "template": "s3", "prompt": "Ada Lovelace stars in The Engine alongside",
                 "spans": {"first_actor": "Ada Lovelace"}, "answer": "Alan Turing"}]
SWEEP = {"name": "fz", "models": [{"name": "tiny", "tiny": "llama", "tiny_layers": 2}],
         "data": {"examples": "examples.jsonl"}, "specs": ["spec.json"], "batch_size": 4, "ks": [1, 5],
         "check_baselines": 1, "output": "out"}


# -- inputs ---------------------------------------------------------------------------------------

def json_values(depth: int = 2) -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12), st.sampled_from(["all", "last", "mlp", "first_actor", "", "-1",
                                                               "main", "cuda", "llama", "gpt2", "ü\x00"]))
    if depth == 0:
        return scalars
    inner = json_values(depth - 1)
    return st.one_of(scalars, st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3))


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (keys and indexes), the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, prefix + (i,))
    return found


@st.composite
def mutated(draw, seed: Any) -> Any:
    """``seed`` with a few nodes replaced, deleted or given an extra key."""
    value = copy.deepcopy(seed)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(paths(value)))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not where:
            if action == "replace":
                value = draw(json_values())
            continue
        parent = value
        for part in where[:-1]:
            parent = parent[part]
        key = where[-1]
        if action == "replace":
            parent[key] = draw(json_values())
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values())
        else:
            parent.insert(key, draw(json_values()))
    return value


@st.composite
def encoded(draw, text: str) -> bytes:
    """``text`` as bytes: UTF-8 mostly, sometimes another encoding, a BOM, cut off, or bytes flipped."""
    how = draw(st.sampled_from(["utf-8"] * 12 + ["latin-1", "utf-16", "utf-32", "utf-8-sig", "cut", "flip",
                                                 "empty", "nested", "huge", "duplicate"]))
    if how == "cut":
        data = text.encode()
        return data[:draw(st.integers(0, len(data)))]
    if how == "flip":
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "empty":
        return draw(st.sampled_from([b"", b"\n", b"null", b"[]", b"{}", b"0", b'"x"']))
    if how == "nested":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        return ("[" * depth + "]" * depth).encode() if draw(st.booleans()) else ('{"a":' * depth + "1" + "}" * depth).encode()
    if how == "huge":
        return text.replace('"', '"' + "x" * 100_000, 1).encode()
    if how == "duplicate":
        return text.replace("{", '{"name": "dup", "name": "dup2", ', 1).encode()
    if how == "latin-1":
        return (text + "é").encode("latin-1", errors="replace")
    return text.encode(how)


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n" for r in rows)


@st.composite
def inputs(draw) -> tuple[str, dict[str, bytes]]:
    """(which command, {file name: bytes}) with one of the files fuzzed, the others valid."""
    files = {"spec.json": json.dumps(SPEC).encode(), "facts.jsonl": jsonl(FACTS).encode(),
             "examples.jsonl": jsonl(EXAMPLE_ROWS).encode(), "sweep.json": json.dumps(SWEEP).encode()}
    target = draw(st.sampled_from(["spec", "spec", "facts", "examples", "sweep", "sweep"]))
    if target == "spec":
        seed = draw(st.sampled_from([SPEC, SPEC_SIMPLE]))
        files["spec.json"] = draw(encoded(json.dumps(draw(mutated(seed)), allow_nan=True)))
        command = draw(st.sampled_from(["validate", "run", "payload"]))
    elif target == "facts":
        rows = draw(mutated(FACTS))
        text = jsonl(rows) if isinstance(rows, list) else json.dumps(rows, allow_nan=True)
        files["facts.jsonl"] = draw(encoded(text))
        command = "run-facts"
    elif target == "examples":
        rows = draw(mutated(EXAMPLE_ROWS))
        text = jsonl(rows) if isinstance(rows, list) else json.dumps(rows, allow_nan=True)
        files["examples.jsonl"] = draw(encoded(text))
        command = "run"
    else:
        files["sweep.json"] = draw(encoded(json.dumps(draw(mutated(SWEEP)), allow_nan=True)))
        command = "sweep"
    return command, files


def argv(command: str, folder: Path) -> list[str]:
    spec, out = str(folder / "spec.json"), str(folder / "out")
    if command == "validate":
        return ["validate", spec, "--model-type", "llama", "--layers", "2"]
    if command == "payload":
        return ["payload", spec, "--model", str(_config_folder()), "--donor", "dense"]
    if command == "run":
        return ["run", "--tiny", "llama", "--spec", spec, "--data", str(folder / "examples.jsonl"), "-o", out,
                "--batch-size", "8", "--no-progress", "--k", "5"]
    if command == "run-facts":
        return ["run", "--tiny", "llama", "--spec", spec, "--facts", str(folder / "facts.jsonl"), "--template",
                "sentence_3", "-o", out, "--batch-size", "8", "--no-progress", "--k", "5"]
    return ["sweep", str(folder / "sweep.json"), "--no-progress", "--k", "5"]


# -- running cheaply ---------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _config_folder() -> Path:
    from nngraft.testing import tiny_config

    folder = Path(tempfile.mkdtemp(prefix="nngraft-fuzz-config-"))
    tiny_config("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cheap_models():
    """tiny_pair built once per (type, depth) and deep-copied per run (a run may cast it in place)."""
    from nngraft import testing as tiny

    real = tiny.tiny_pair
    built: dict[tuple, tuple] = {}

    def tiny_pair(model_type: str = "llama", *, n_layers: int = 2, seed: int = 0):
        key = (model_type, n_layers, seed)
        if key not in built:
            built[key] = real(model_type, n_layers=n_layers, seed=seed)
        P, F, tok = built[key]
        return copy.deepcopy(P), copy.deepcopy(F), tok

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "tiny_pair", tiny_pair)
        yield


@pytest.fixture(scope="module")
def keep(tmp_path_factory, cheap_models) -> Path:
    """A results folder from a real run, which fuzzed runs must never change (except by appending)."""
    folder = tmp_path_factory.mktemp("fuzz-keep")
    (folder / "spec.json").write_text(json.dumps(SPEC))
    (folder / "examples.jsonl").write_text(jsonl(EXAMPLE_ROWS))
    (folder / "sweep.json").write_text(json.dumps(dict(SWEEP, output="keep")))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", str(folder / "sweep.json"), "--no-progress"]) == 0
    return folder / "keep"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(args)
        except SystemExit as stop:  # argparse / usage errors
            code = stop.code
    return code, err.getvalue()


# -- the property ------------------------------------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None, database=None,
          derandomize=os.environ.get("NNGRAFT_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=inputs(), into_keep=st.booleans())
def test_fuzzed_files_end_in_success_or_a_user_error(keep, case, into_keep):
    command, files = case
    before = snapshot(keep)
    with tempfile.TemporaryDirectory(prefix="nngraft-fuzz-") as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        args = argv(command, folder)
        if command == "sweep":  # never the config's own "output": a fuzzed path could be anywhere
            args += ["-o", str(folder / "out")]
        if into_keep and "-o" in args:
            args[args.index("-o") + 1] = str(keep)  # a fuzzed run aimed at existing results
        code, err = run_cli(args)
        event(f"{command}: exit {code}")  # shown by pytest --hypothesis-show-statistics
        assert code in (0, 2), f"exit code {code} for {args}:\n{err}"
        assert "Traceback" not in err, err
        if code == 2:
            assert any(mark in err for mark in ("error:", "usage", "✗")), err  # one message
    after = snapshot(keep)
    if code == 2:
        assert after == before, f"a failed run changed {keep}:\n{err}"
    else:
        for name, data in before.items():  # results only grow; the manifest is rewritten whole
            assert name in after and (name != "results.jsonl" or after[name].startswith(data))
