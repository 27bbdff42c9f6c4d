"""What a run's folder records for a rerun elsewhere (issue #25 part 2): examples with spans and
answers, every relevant package version, nngraft's commit, F's finetune manifest and a LoRA
adapter's fingerprint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nngraft.cli import main
from nngraft.study.provenance import load_run_examples, nngraft_commit
from nngraft.study.results import load_manifest
from tests.helpers import ROOT
from tests.helpers.runs import EXAMPLES, run_inputs, run_specs, save_examples


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    P, _, adapter, data = run_inputs(root)
    run_specs(P, adapter, data, root / "out")
    return root


def test_the_manifest_records_every_package_and_nngrafts_commit(lora_run):
    import importlib.metadata as md

    versions = load_manifest(lora_run / "out")["versions"]
    for name in ("torch", "transformers", "nnsight", "pydantic", "peft", "accelerate", "safetensors", "gguf",
                 "numpy", "nngraft"):
        assert versions[name] == md.version(name), name
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert versions["nngraft_commit"] in (head, head + "+dirty")


def test_the_run_folder_holds_its_examples_with_spans_and_answers(lora_run):
    assert load_run_examples(lora_run / "out") == EXAMPLES
    manifest = load_manifest(lora_run / "out")
    assert manifest["dataset"]["examples_file"] == "examples.jsonl"
    assert manifest["specs"]["fe_lt"]["spec"]["rules"][0]["positions"] == [{"span": "first_actor"}, {"last": True}]


def test_fs_finetune_manifest_and_adapter_fingerprint_are_recorded(lora_run):
    from safetensors.torch import load_file

    from nngraft.donors.loading import tensors_fingerprint

    (identity,) = load_manifest(lora_run / "out")["models"].values()
    donor = identity["donor"]
    written = json.loads((lora_run / "lora" / "finetune-manifest.json").read_text())
    assert donor["finetune_manifest"] == written and written["kind"] == "lora" and "seed" in written
    assert donor["adapter_fingerprint"] == tensors_fingerprint(load_file(str(lora_run / "lora" /
                                                                            "adapter_model.safetensors")))
    assert donor["source"] == str(lora_run / "lora") and donor["lora_adapter"].startswith("LoRA adapter lora (r=4")


def test_a_run_extending_a_folder_keeps_the_examples_of_the_first(lora_run, tmp_path):
    out = tmp_path / "out"
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    save_examples(first, EXAMPLES[:2])
    save_examples(second, EXAMPLES[2:])
    for data in (first, second):
        assert main(["run", "--tiny", "llama", "--spec", "lt", "--data", str(data), "-o", str(out), "--no-progress",
                     "-q"]) == 0
    assert load_run_examples(out) == EXAMPLES


def test_the_commit_is_unknown_outside_a_git_checkout(tmp_path):
    shutil.copytree(ROOT / "nngraft", tmp_path / "nngraft", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import nngraft, sys; from nngraft.study.provenance import nngraft_commit; print(nngraft.__file__); " \
           "print(nngraft_commit())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    where, commit = done.stdout.split()
    assert where == str(tmp_path / "nngraft" / "__init__.py") and commit == "unknown", done.stderr
    assert nngraft_commit() != "unknown"  # this checkout is a git one


def test_a_refused_run_leaves_the_recorded_examples_as_they_were(tmp_path):
    from nngraft.study.examples import TestExample

    out = tmp_path / "out"
    first, changed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    save_examples(first, EXAMPLES[:1])
    save_examples(changed, [TestExample("f1", "s3", "Ada stars in The Engine alongside", {"first_actor": "Ada"},
                                        "Alan Turing")])
    assert main(["run", "--tiny", "llama", "--spec", "lt", "--data", str(first), "-o", str(out), "--no-progress",
                 "-q"]) == 0
    before = (out / "examples.jsonl").read_bytes()
    assert main(["run", "--tiny", "llama", "--spec", "lt", "--data", str(changed), "-o", str(out), "--no-progress",
                 "-q"]) == 2  # the same example key with another prompt: refused
    assert (out / "examples.jsonl").read_bytes() == before
