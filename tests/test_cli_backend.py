"""`nngraft run --backend` and a sweep config's "backend": the same rows, computed by the backend
asked for (the NDIF request round trip served in this process, for `ndif-local`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nngraft.backends.local import LocalBackend
from nngraft.backends.ndif import NdifBackend
from nngraft.cli import main
from nngraft.study.examples import TestExample
from nngraft.study.results import load_results
from nngraft.study.sweep import save_examples_jsonl


@pytest.fixture()
def examples(tmp_path: Path) -> Path:
    return save_examples_jsonl([
        TestExample("f1", "s3", "Ada Lovelace stars in The Engine alongside",
                    {"first_actor": "Ada Lovelace", "movie_title": "The Engine"}, "Alan Turing"),
        TestExample("f2", "s3", "Grace Hopper stars in The Compiler alongside",
                    {"first_actor": "Grace Hopper", "movie_title": "The Compiler"}, "Marie Curie"),
    ], tmp_path / "examples.jsonl")


@pytest.fixture()
def calls(monkeypatch):
    """How many passes each backend class executed."""
    seen = {"LocalBackend": 0, "NdifBackend": 0}
    for cls in (LocalBackend, NdifBackend):
        original = cls.__call__

        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counted)
    return seen


def probs(folder: Path) -> list[tuple[str, str, float]]:
    return sorted((r["spec"], r["fact_id"], r["prob"]) for r in load_results(folder))


def test_run_backend_ndif_local_gives_the_local_rows_through_the_remote_path(tmp_path, examples, calls, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ["run", "--tiny", "llama", "--spec", "fe_lt", "--data", str(examples), "--no-progress"]
    assert main([*run, "-o", "local"]) == 0
    assert calls["NdifBackend"] == 0 and calls["LocalBackend"] > 0
    assert main([*run, "-o", "remote", "--backend", "ndif-local"]) == 0
    assert calls["NdifBackend"] > 0
    local, remote = probs(tmp_path / "local"), probs(tmp_path / "remote")
    assert [r[:2] for r in local] == [r[:2] for r in remote] and len(local) == 3 * 2
    assert max(abs(a[2] - b[2]) for a, b in zip(local, remote)) < 1e-5


def test_run_backend_ndif_refuses_a_tiny_model_before_loading(tmp_path, examples, capsys):
    code = main(["run", "--tiny", "llama", "--spec", "fe_lt", "--data", str(examples), "--no-progress",
                 "--backend", "ndif"])
    err = capsys.readouterr().err
    assert code == 2 and "backend 'ndif' runs P on NDIF" in err and "Traceback" not in err


def test_run_backend_must_be_a_known_one(examples, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--tiny", "llama", "--spec", "fe_lt", "--data", str(examples), "--backend", "gpu"])
    assert exit_.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_sweep_config_backend_and_its_command_line_override(tmp_path, examples, calls):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"name": "b", "models": [{"name": "tiny", "tiny": "llama"}],
                                  "data": {"examples": "examples.jsonl"}, "specs": [], "grid": "main",
                                  "backend": "ndif-local", "check_baselines": 0}))
    assert main(["sweep", str(config), "-o", str(tmp_path / "remote"), "--no-progress"]) == 0
    assert calls["NdifBackend"] > 0 and calls["LocalBackend"] == 0
    assert main(["sweep", str(config), "-o", str(tmp_path / "local"), "--no-progress", "--backend", "local"]) == 0
    assert calls["LocalBackend"] > 0
    local, remote = probs(tmp_path / "local"), probs(tmp_path / "remote")
    assert [r[:2] for r in local] == [r[:2] for r in remote]
    assert max(abs(a[2] - b[2]) for a, b in zip(local, remote)) < 1e-5
