"""Output streams and result columns of the CLI: results and tables on stdout, logs and progress on
stderr, --quiet, run --json, per-row recovery, the answer log-probability column, clean errors."""

from __future__ import annotations

import json

import pytest
import torch

from nngraft.cli import main
from nngraft.study.results import load_results

RUN = ["run", "--tiny", "llama", "--spec", "recipes/specs/fe_lt.json", "--spec", "recipes/specs/lt.json",
       "--dataset", "fake_movies_fake_actors", "--n", "3", "--template", "sentence_1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(RUN + ["-o", str(out), "--answer-logprob"]) == 0
    return out


def test_results_rows_carry_recovery_against_the_runs_own_p_and_f_rows(run_dir):
    rows = load_results(run_dir)
    base = {(r["spec"], r["example"]): r["prob"] for r in rows if r["spec"] in ("p", "f")}
    graft_rows = [r for r in rows if r["spec"] not in ("p", "f")]
    assert graft_rows
    for r in rows:
        p, f = base[("p", r["example"])], base[("f", r["example"])]
        assert (r["p_prob"], r["f_prob"]) == (p, f)
        if abs(f - p) < 0.05:
            assert r["recovery"] is None
        else:
            assert r["recovery"] == pytest.approx((r["prob"] - p) / (f - p), rel=1e-12)
    # (tiny random models: |F − P| is below the gap here; tests/study/test_own_facts.py checks values)


def test_table_on_stdout_logs_on_stderr_with_row_recovery_and_answer_logprob(tmp_path, capsys):
    assert main(RUN + ["--answer-logprob"]) == 0
    captured = capsys.readouterr()
    assert "median row recovery" in captured.out and "answer logprob" in captured.out
    assert "loading models" in captured.err and "loading models" not in captured.out
    assert "Loading weights" not in captured.err  # only our own progress and logs


def test_quiet_leaves_stderr_empty_and_json_is_parseable(tmp_path, capsys):
    assert main(RUN + ["--quiet", "--json", "-o", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    doc = json.loads(captured.out)
    assert doc["results"] == str(tmp_path / "r" / "results.jsonl")
    by_spec = {(s["spec"], s["template"]): s for s in doc["summary"]}
    assert set(by_spec) == {("p", "sentence_1"), ("f", "sentence_1"), ("fe_lt", "sentence_1"), ("lt", "sentence_1")}
    rows = load_results(tmp_path / "r")
    fe_lt = [r["prob"] for r in rows if r["spec"] == "fe_lt"]
    assert by_spec[("fe_lt", "sentence_1")]["prob"]["mean"] == pytest.approx(sum(fe_lt) / len(fe_lt))
    assert by_spec[("p", "sentence_1")]["facts"] == 3


def test_errors_still_print_under_quiet(capsys):
    code = main(["run", "--tiny", "mamba", "--spec", "recipes/specs/lt.json", "--dataset",
                 "fake_movies_fake_actors", "--n", "2", "--template", "sentence_1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err  # a user error: exit 2, one message
    assert "no tiny model of type 'mamba'; known: gemma" in captured.err


def test_payload_with_an_uncached_hub_id_offline_is_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("NNGRAFT_CACHE", str(tmp_path / "cache"))
    code = main(["payload", "recipes/specs/lt.json", "--model", "meta-llama/Llama-3.2-1B"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert "no model 'meta-llama/Llama-3.2-1B'" in captured.err and "does not download models" in captured.err


def test_localize_prints_its_finding_on_stdout(tmp_path, capsys):
    code = main(["localize", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "3",
                 "--template", "sentence_1", "--targets", "donor_top1", "--metric", "logprob",
                 "--target", "0.5", "-o", str(tmp_path / "loc"), "--no-progress", "--no-plot"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith("found ") and f"spec: {tmp_path / 'loc' / 'spec.json'}" in captured.out
    assert "nngraft localize" in captured.err and "\nfound " not in captured.err


def test_run_grid_progress_writes_one_line_to_stderr_and_nothing_to_stdout(capsys):
    from nngraft import Grafter, GraftSpec
    from nngraft.testing import tiny_pair

    P, F, tok = tiny_pair("llama")
    specs = [GraftSpec.load("recipes/specs/fe_lt.json"), GraftSpec.load("recipes/specs/lt.json")]
    grid = Grafter(P, F, tok).run_grid(specs, ["Ada Lovelace stars in a movie alongside"],
                                       [{"first_actor": "Ada Lovelace"}], progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("grafting: 2/2 rows (100%), elapsed ") and captured.err.count("\n") == 1
    assert repr(grid["lt"]) == (f"GraftResult(logits=(1, {len(tok)}), specs=['lt'], "
                                "prompts=['Ada Lovelace stars in a movie alongside'])")


def test_target_prob_takes_token_ids_without_a_tokenizer():
    from nngraft.result import GraftResult

    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    r = GraftResult(logits=logits, prompts=["a", "b"])
    torch.testing.assert_close(r.target_prob([2, 0]), torch.stack([logits[0].softmax(-1)[2], logits[1].softmax(-1)[0]]))
    with pytest.raises(ValueError, match=r"no tokenizer to turn answer strings into token ids; pass token ids instead"):
        r.target_prob("Alan")
