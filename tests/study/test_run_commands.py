"""`nngraft run`, `nngraft sweep`, `nngraft plot`: via subprocess (as a user runs them) and, for the
error paths, in-process (exit codes 0 ok / 2 a user error with one message, or bad usage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nngraft.backends.local import LocalBackend
from nngraft.backends.ndif import NdifBackend
from nngraft.cli import main
from nngraft.study.results import load_manifest, load_results
from nngraft.study.sweep import save_examples_jsonl
from tests.helpers import ROOT
from tests.helpers.examples import TWO_FACTS

SPECS = ROOT / "recipes" / "specs"


def nngraft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nngraft.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture()
def examples(tmp_path: Path) -> Path:
    return save_examples_jsonl(TWO_FACTS, tmp_path / "examples.jsonl")


def test_help_lists_the_study_commands(tmp_path):
    result = nngraft("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("run", "sweep", "plot"):
        assert name in result.stdout


def test_run_then_plot(tmp_path, examples):
    result = nngraft("run", "--tiny", "llama", "--spec", str(SPECS / "fe_lt.json"), "--spec", str(SPECS / "lt.json"),
                     "--data", str(examples), "-o", "out", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for spec in ("fe_lt", "lt", "p (P)", "f (F)"):
        assert spec in result.stdout
    assert "recovery" in result.stdout and "top-100" in result.stdout
    for column in ("logit diff", "KL(F‖G)", "KL(G‖P)"):
        assert column in result.stdout
    rows = load_results(tmp_path / "out")
    assert len(rows) == 4 * 2 and {r["spec"] for r in rows} == {"p", "f", "fe_lt", "lt"}
    # P is P and F is F: each is at KL 0 from itself (the numbers themselves: tests/study/test_metrics.py)
    assert all(abs(r["kl_graft_p"]) < 1e-5 for r in rows if r["spec"] == "p")
    assert all(abs(r["kl_f_graft"]) < 1e-5 for r in rows if r["spec"] == "f")
    assert all(r["kl_f_graft"] > 1e-3 for r in rows if r["spec"] == "p")
    assert load_manifest(tmp_path / "out")["baseline_check"]["tiny-llama"]["ok"] is True

    result = nngraft("plot", "out", "--k", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "plots" / "bars_positions_tiny-llama_s3.png").stat().st_size > 1000
    assert (tmp_path / "out" / "plots" / "bars_positions_tiny-llama_s3.svg").exists()
    assert "wrote 3 files" in result.stderr


def test_sweep_config_with_plots_and_resume(tmp_path, examples):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"name": "cli", "models": [{"name": "tiny", "tiny": "gpt2"}],
                                  "data": {"examples": "examples.jsonl"}, "grid": "main", "output": "runs/cli"}))
    result = nngraft("sweep", str(config), "--plot", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "16 rows written, 0 already done" in result.stderr
    assert len(load_results(tmp_path / "runs" / "cli")) == 16
    assert (tmp_path / "runs" / "cli" / "plots" / "bars_positions_tiny_s3.png").exists()
    again = nngraft("sweep", str(config), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and "0 rows written, 16 already done" in again.stderr


def test_errors_exit_2_with_a_message(tmp_path, examples):
    result = nngraft("run", "--tiny", "llama", "--spec", "missing.json", "--data", str(examples), cwd=tmp_path)
    assert result.returncode == 2
    assert "error:" in result.stderr and "no spec file" in result.stderr and "Traceback" not in result.stderr


def test_spec_by_built_in_name_runs_the_same_spec_as_its_file(tmp_path, examples, capsys, monkeypatch):
    """`--spec fe_lt` works from any folder (what `nngraft finetune` suggests next)."""
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    by_file = ["--spec", str(SPECS / "fe_lt.json"), "--spec", str(SPECS / "lt.json")]
    for name, specs in (("files", by_file), ("names", ["--spec", "fe_lt", "--spec", "lt"])):
        assert main(["run", "--tiny", "llama", *specs, "--data", str(examples), "-o", name, "--no-progress"]) == 0
    files, names = load_results(tmp_path / "files"), load_results(tmp_path / "names")
    assert [(r["spec"], r["spec_hash"], r["prob"]) for r in files] == [(r["spec"], r["spec_hash"], r["prob"]) for r in names]
    assert {r["spec"] for r in names} == {"p", "f", "fe_lt", "lt"}
    capsys.readouterr()
    assert main(["run", "--tiny", "llama", "--spec", "fe_lt_typo", "--data", str(examples), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"--spec fe_lt_typo: no spec file at {tmp_path / 'fe_lt_typo'}, and no built-in spec has that name "
            "(built-in: p, f, fe, lt, fe_lt, … — the names of the files in recipes/specs/") in err
    (tmp_path / "lt").write_text(json.dumps({"schema_version": "1", "name": "mine", "rules": []}))
    assert main(["run", "--tiny", "llama", "--spec", "lt", "--data", str(examples), "-o", "own", "--no-progress"]) == 0
    assert {r["spec"] for r in load_results(tmp_path / "own")} == {"mine", "f"}  # a file of that name wins


def test_usage_errors_exit_2(tmp_path, examples, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--data", str(examples)])  # no --spec
    assert exit_.value.code == 2
    assert "give --spec SPEC (a file or a built-in name such as fe_lt) and/or --grid NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--spec", str(SPECS / "lt.json"), "--data", str(examples)])
    assert exit_.value.code == 2
    assert "give --model and --donor" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--spec", str(SPECS / "lt.json"), "--tiny", "llama", "--data", str(examples),
              "--template", "sentence_3"])
    assert exit_.value.code == 2


def test_bad_config_and_missing_results_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [], "data": {"examples": "e.jsonl"}, "grid": "main"}))
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid sweep config" in err and "models" in err
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no results file" in capsys.readouterr().err


def test_run_from_a_built_in_dataset_and_template(tmp_path, capsys):
    code = main(["run", "--tiny", "gpt2", "--spec", str(SPECS / "fe.json"), "--dataset", "fake_movies_real_actors",
                 "--n", "2", "--template", "sentence_3", "--no-progress", "-o", str(tmp_path / "out")])
    assert code == 0
    rows = load_results(tmp_path / "out")
    assert {r["template"] for r in rows} == {"sentence_3"} and len(rows) == 3 * 2
    assert load_manifest(tmp_path / "out")["dataset"]["dataset"] == "fake_movies_real_actors"
    assert "sentence_3" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# nngraft run --donor NAME=PATH (named donors for rules with "donor": NAME)
# ---------------------------------------------------------------------------------------------

HYBRID_SPEC = {"name": "f_mlp_hybrid_o_lt", "rules": [
    {"components": ["mlp"], "positions": [{"span": "first_actor"}]},
    {"components": ["o"], "positions": [{"last": True}], "donor": "hybrid"}]}


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """P, F and a hybrid donor H (P perturbed differently) saved as folders, and a spec using H."""
    from nngraft.testing import perturbed_copy, tiny_pair

    root = tmp_path_factory.mktemp("named-donors")
    P, F, tok = tiny_pair("llama")
    for name, model in (("P", P), ("F", F), ("H", perturbed_copy(P, seed=7))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "hybrid.json").write_text(json.dumps(HYBRID_SPEC))
    return root


def _direct_probs(root: Path, donors: dict[str, str], examples: Path):
    """What Grafter(P, F, tok, donors=...) gives for HYBRID_SPEC: {fact_id: next-token probabilities}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nngraft import GraftSpec, Grafter

    load = lambda name: AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()  # noqa: E731
    tok = AutoTokenizer.from_pretrained(root / "P")
    g = Grafter(load("P"), load("F"), tok, donors={k: load(v) for k, v in donors.items()})
    exs = [json.loads(line) for line in examples.read_text().splitlines()]
    spec = GraftSpec.model_validate(HYBRID_SPEC)
    logits = g.run(spec, [e["prompt"] for e in exs], [e["spans"] for e in exs]).logits
    probs = torch.softmax(logits.float(), -1)
    return {e["fact_id"]: probs[j] for j, e in enumerate(exs)}


def test_run_with_a_named_donor_equals_grafter_with_donors(three_models, examples, capsys):
    root = three_models
    out = root / "out"
    code = main(["run", "--model", str(root / "P"), "--donor", str(root / "F"), "--donor", f"hybrid={root / 'H'}",
                 "--spec", str(root / "hybrid.json"), "--data", str(examples), "--no-progress", "-o", str(out)])
    assert code == 0, capsys.readouterr()
    rows = {r["fact_id"]: r for r in load_results(out) if r["spec"] == "f_mlp_hybrid_o_lt"}
    expected = _direct_probs(root, {"hybrid": "H"}, examples)
    with_f = _direct_probs(root, {"hybrid": "F"}, examples)  # F's o at the last token instead of H's
    assert rows.keys() == expected.keys() == {"f1", "f2"}
    for fact, row in rows.items():
        assert row["prob"] == pytest.approx(float(expected[fact][row["target_id"]]), rel=1e-5, abs=1e-7)
        assert row["top_probs"][0] == pytest.approx(float(expected[fact].max()), abs=1e-6)  # stored rounded
        # H really is used: with F in its place the number is another one
        assert abs(float(with_f[fact][row["target_id"]]) - row["prob"]) > 1e-6
    manifest = load_manifest(out)
    (ident,) = manifest["models"].values()
    assert ident["donors"]["hybrid"]["source"] == str(root / "H")


def test_run_named_donor_errors(three_models, examples, capsys, tmp_path):
    root = three_models
    base = ["run", "--model", str(root / "P"), "--spec", str(root / "hybrid.json"), "--data", str(examples),
            "--no-progress"]
    usage = {
        ("--donor", "F", "--donor", "G"): "--donor given twice without a name ('F' and 'G'): give F once, and "
                                          "each further donor as NAME=PATH",
        ("--donor", "F", "--donor", "hybrid="): "--donor 'hybrid=': a named donor is NAME=PATH",
        ("--donor", "F", "--donor", "=H"): "--donor '=H': a named donor is NAME=PATH",
        ("--donor", "F", "--donor", "runs/lr=1e-4"): "--donor 'runs/lr=1e-4': a named donor is NAME=PATH",
        ("--donor", "F", "--donor", "default=H"): "'default' is the main donor F; give it as --donor PATH",
        ("--donor", "F", "--donor", "hybrid=H", "--donor", "hybrid=G"): "--donor hybrid= given twice ('H' and 'G')",
    }
    for donors, message in usage.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(base + list(donors))
        assert exit_.value.code == 2
        assert message in " ".join(capsys.readouterr().err.split())
    # a spec naming a donor that was not given: exit 2, before any model is loaded
    out = tmp_path / "never"
    assert main(base + ["--donor", str(root / "F"), "-o", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("spec 'f_mlp_hybrid_o_lt' grafts from donor(s) 'hybrid', which this command was not given (given: F "
            "(--donor PATH)); add --donor hybrid=PATH (a finetuned copy of P: local folder or hub id)") in err
    assert not out.exists()
    assert main(base + ["--donor", str(root / "F"), "--donor", f"relation={root / 'H'}", "-o", str(out)]) == 2
    assert f"(given: F (--donor PATH), relation={root / 'H'}); add --donor hybrid=PATH" in " ".join(
        capsys.readouterr().err.split())


# ---------------------------------------------------------------------------------------------
# --backend: the same rows, computed by the backend asked for (ndif-local: the NDIF request round
# trip served in this process)
# ---------------------------------------------------------------------------------------------


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
