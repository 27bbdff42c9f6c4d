"""A researcher's own study from the command line, with facts that are not about movies: five
invented inventors and their devices, their own training and test templates, through
finetune → run → plot → localize on a tiny saved model (the path docs/study.md describes)."""

from __future__ import annotations

import contextlib
import io
import json
import shlex

import pytest
import torch

from nngraft.cli import main
from nngraft.study.results import load_results
from nngraft.study.sweep import direct_probs
from nngraft.study.templates import make_test_examples
from nngraft.study.data import load_facts

FACTS = [
    {"id": "i1", "inventor": "Ada Quenby", "device": "loom engine", "city": "Harrowgate"},
    {"id": "i2", "inventor": "Ivo Pemberton", "device": "tide clock", "city": "Lowmere"},
    {"id": "i3", "inventor": "Mara Oakshott", "device": "glass kiln", "city": "Eastwick"},
    {"id": "i4", "inventor": "Tobin Vale", "device": "wind organ", "city": "Corrby"},
    {"id": "i5", "inventor": "Selma Brisk", "device": "rope lift", "city": "Dunmore"},
]
TRAINING = "{inventor} of {city} built the {device}.\nThe {device} was built by {inventor}.\n"
TESTS = {"built": "{inventor} of {city} built the", "known": "People in {city} know {inventor} for the"}
SPEC = {"schema_version": "1", "name": "inventor_last",
        "rules": [{"components": ["all"], "positions": [{"span": "inventor"}, {"last": True}]}]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every step of the study once; the tests below check what each step left."""
    from nngraft.testing import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("own")
    tok = tiny_tokenizer("gpt2")
    tiny_model("llama", n_layers=4, vocab_size=len(tok)).save_pretrained(root / "P")
    tok.save_pretrained(root / "P")
    (root / "inventors.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    (root / "bio.txt").write_text(TRAINING)
    (root / "tests.json").write_text(json.dumps(TESTS))
    (root / "spec.json").write_text(json.dumps(SPEC))
    P, F, out = str(root / "P"), str(root / "F"), root / "out"
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # what finetune says to run next
        finetuned = main(["finetune", "--model", P, "--facts", str(root / "inventors.jsonl"), "--templates",
                          str(root / "bio.txt"), "--out", F, "--preset", "cpu-fast", "--epochs", "30", "--lr", "1e-2",
                          "--device", "cpu", "--no-progress"])
    (root / "finetune.log").write_text(log.getvalue())
    codes = {
        "finetune": finetuned,
        "run": main(["run", "--spec", str(root / "spec.json"), "--model", P, "--donor", F, "--facts",
                     str(root / "F" / "facts.jsonl"), "--template", str(root / "tests.json"), "--answer-field",
                     "device", "-o", str(out), "--no-progress"]),
        "plot": main(["plot", str(out)]),
        "localize": main(["localize", "--model", P, "--donor", F, "--facts", str(root / "F" / "facts.jsonl"),
                          "--template", TESTS["built"], "--answer-field", "device", "--target", "0.5",
                          "-o", str(root / "loc"), "--no-progress"]),
    }
    # the found spec, run and plotted beside the user's own spec
    codes["run found"] = main(["run", "--spec", str(root / "spec.json"), "--spec", str(root / "loc" / "spec.json"),
                               "--model", P, "--donor", F, "--facts", str(root / "F" / "facts.jsonl"),
                               "--template", TESTS["built"], "--answer-field", "device", "-o", str(root / "out2"),
                               "--no-progress", "--quiet"])
    return root, codes


def test_every_step_succeeds(study):
    _, codes = study
    assert codes == {"finetune": 0, "run": 0, "plot": 0, "localize": 0, "run found": 0}


def test_finetune_used_the_users_templates_over_the_facts_own_fields(study):
    root, _ = study
    manifest = json.loads((root / "F" / "finetune-manifest.json").read_text())
    assert manifest["training_texts"]["templates"]["families"] == {"custom": TRAINING.strip().splitlines()}
    assert manifest["training_texts"]["directions"] == ["A2B"]
    assert manifest["n_texts"] == 2 * len(FACTS)
    assert [f.fields for f in load_facts(root / "F" / "facts.jsonl")] == [
        {k: v for k, v in f.items() if k != "id"} for f in FACTS]


def test_the_run_command_finetune_prints_next_works_from_any_folder(study, tmp_path, monkeypatch):
    """Its spec is a built-in name that fits any facts (`lt`), not a repository file of movie spans;
    the user fills in only their test templates and answer field."""
    root, _ = study
    log = (root / "finetune.log").read_text()
    assert f"P (the recipient) is {root / 'P'}" in log
    [line] = [x.strip() for x in log.splitlines() if x.strip().startswith("nngraft run ")]
    assert "--spec lt " in line and "--template TEST_TEMPLATES.txt --answer-field FIELD" in line
    argv = shlex.split(line.replace("TEST_TEMPLATES.txt", str(root / "tests.json")).replace("FIELD", "device"))
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    assert main([*argv[1:], "-o", "next", "--no-progress", "--quiet"]) == 0
    rows = load_results(tmp_path / "next")
    assert {r["spec"] for r in rows} == {"p", "f", "lt"} and len(rows) == 3 * len(FACTS) * len(TESTS)


def test_run_rows_are_plain_forwards_for_p_and_f_on_the_users_prompts(study):
    from nngraft.donors.loading import load_model

    root, _ = study
    rows = load_results(root / "out")
    assert {r["template"] for r in rows} == set(TESTS)
    assert {r["spec"] for r in rows} == {"p", "f", "inventor_last"}
    assert len(rows) == 3 * len(FACTS) * len(TESTS)
    facts = load_facts(root / "F" / "facts.jsonl")
    examples = [e for name, t in TESTS.items() for e in make_test_examples(facts, t, "device", name=name)]
    P, tok = load_model(root / "P")
    F, _ = load_model(root / "F")
    by_key = {(r["spec"], r["fact_id"], r["template"]): r for r in rows}
    for role, model in (("p", P), ("f", F)):
        for ex, prob in zip(examples, direct_probs(model, tok, examples)):
            assert by_key[(role, ex.fact_id, ex.template)]["prob"] == pytest.approx(prob, abs=1e-5)
    assert not torch.allclose(P.model.layers[0].mlp.up_proj.weight, F.model.layers[0].mlp.up_proj.weight)
    recovered = [r for r in rows if r["spec"] == "inventor_last" and r["recovery"] is not None]
    assert recovered, "F learned the facts, so some rows have |F − P| ≥ 0.05"
    for r in recovered:
        p, f = by_key[("p", r["fact_id"], r["template"])]["prob"], by_key[("f", r["fact_id"], r["template"])]["prob"]
        assert r["recovery"] == pytest.approx((r["prob"] - p) / (f - p), rel=1e-12)


def test_plot_and_localize_wrote_their_files(study):
    root, _ = study
    assert list((root / "out" / "plots").glob("*.png"))
    found = json.loads((root / "loc" / "spec.json").read_text())
    assert found["name"] == "localized" and found["rules"]
    result = json.loads((root / "loc" / "localize.json").read_text())
    assert result["reached"] is True and result["recovery"]["mean"] >= 0.5


def test_plot_specs_chooses_and_orders_bars_with_recovery_panel_and_legend(study, monkeypatch, tmp_path):
    from nngraft.study import plot

    root, _ = study
    drawn = []

    def record(fig, stem, formats):
        axes = fig.get_axes()
        drawn.append({"stem": stem.name, "labels": [t.get_text() for t in axes[-1].get_xticklabels()],
                      "panels": [ax.get_ylabel() for ax in axes],
                      "legend": [t.get_text() for t in axes[0].get_legend().get_texts()]})
        return [stem.with_suffix(".png")]

    monkeypatch.setattr(plot, "_save", record)
    assert main(["plot", str(root / "out2"), "--specs", "f,p,inventor_last,found", "-o", str(tmp_path)]) == 0
    assert {d["stem"] for d in drawn} == {"bars_chosen_F_inventor-of-city-built-the"}
    [chart] = drawn
    assert chart["labels"] == ["F", "P", "inventor+LT", "localized"]  # labelled by what they graft
    assert chart["panels"][0] == "mean target probability" and chart["panels"][-1].startswith("recovery (G − P) / (F − P)")
    assert chart["legend"] == ["baselines (P, F)", "positions together", "found by nngraft localize"]


def test_plot_specs_names_an_unknown_spec_and_a_missing_found_spec(study, capsys, tmp_path):
    root, _ = study
    assert main(["plot", str(root / "out"), "--specs", "p,nope", "-o", str(tmp_path)]) == 2
    assert "--specs names 'nope', which is not in these results; they have p, f, inventor_last" in capsys.readouterr().err
    assert main(["plot", str(root / "out"), "--specs", "p,found", "-o", str(tmp_path)]) == 2
    assert "no spec in these results was found by nngraft localize" in capsys.readouterr().err


def test_localize_compares_the_found_set_with_fe_lt(study):
    root, _ = study
    result = json.loads((root / "loc" / "localize.json").read_text())
    names = [c["name"] for c in result["comparison"]]
    assert names == ["P", "F", "inventor+LT", "found"]
    p, f, ref, found = result["comparison"]
    assert (p["recovery"], f["recovery"]) == (0.0, 1.0)
    assert found["recovery"] == pytest.approx(result["recovery"]["mean"])
    assert ref["recovery"] == pytest.approx((ref["value"] - p["value"]) / (f["value"] - p["value"]))
