"""The paper's specs and grids on facts that are not about movies: the entity span (and the title
and relation spans) are parameters of every built-in spec and grid (``paper_specs(entity="drug")``,
``--entity drug``), so a user's own fields run the whole paper grid with no hand-written spec.
Two schemas: drug → maker and inventor → device (with the city as the M span)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from nngraft import Grafter
from nngraft.cli import main
from nngraft.errors import SpecError
from nngraft.study.grids import PAPER_GRIDS, grid_specs, paper_specs, span_roles
from nngraft.study.results import load_manifest, load_results
from nngraft.study.sweep import SweepConfig, resolve_specs, run_sweep
from nngraft.testing import tiny_pair
from tests.helpers import ROOT

DRUGS = [
    {"id": "d1", "drug": "Zolvatrin", "maker": "Harlow Labs", "indication": "migraine"},
    {"id": "d2", "drug": "Quennamide", "maker": "Bexley Pharma", "indication": "asthma"},
    {"id": "d3", "drug": "Ostrafen", "maker": "Calder Works", "indication": "gout"},
    {"id": "d4", "drug": "Mirelox", "maker": "Dunmore Health", "indication": "eczema"},
]
DRUG_TEMPLATE = "{drug} is made by"
INVENTORS = [
    {"id": "i1", "inventor": "Ada Quenby", "device": "loom engine", "city": "Harrowgate"},
    {"id": "i2", "inventor": "Ivo Pemberton", "device": "tide clock", "city": "Lowmere"},
    {"id": "i3", "inventor": "Mara Oakshott", "device": "glass kiln", "city": "Eastwick"},
]
INVENTOR_TEMPLATE = "{inventor} of {city} built the"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _swap_span(obj, old, new):
    """The spec JSON with every span ``old`` renamed ``new``."""
    if isinstance(obj, dict):
        return {k: (new if k == "span" and v == old else _swap_span(v, old, new)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_swap_span(v, old, new) for v in obj]
    return obj


@pytest.mark.parametrize("roles", [{"entity": "drug"}, {"entity": "inventor", "title": "city", "relation": "verb"}])
def test_every_paper_spec_is_the_movie_spec_with_the_spans_renamed(roles):
    movie, mine = paper_specs(), paper_specs(**roles)
    assert list(movie) == list(mine)
    defaults = span_roles()
    for name, spec in movie.items():
        expected = spec.model_dump(mode="json", by_alias=True)["rules"]
        for role, field in roles.items():
            expected = _swap_span(expected, defaults[role], field)
        assert mine[name].model_dump(mode="json", by_alias=True)["rules"] == expected, name
        renamed = {defaults[r] for r in roles}
        assert not (mine[name].rule_names_span() & renamed), name
    assert mine["fe_lt"].rule_names_span() == {roles["entity"]}
    assert "FE = the " + repr(roles["entity"]) + " span" in mine["fe_lt"].description
    # the defaults are the shipped movie specs, unchanged
    assert paper_specs(entity="first_actor")["fe_lt"].to_json() == movie["fe_lt"].to_json()


def test_every_grid_takes_the_span_names():
    for grid in PAPER_GRIDS:
        specs = grid_specs(grid, entity="drug", title="indication", relation="verb")
        spans = set().union(*(s.rule_names_span() for s in specs))
        assert spans <= {"drug", "indication", "verb"}, grid
    assert set().union(*(s.rule_names_span() for s in grid_specs("movie", entity="drug", title="indication"))) \
        == {"drug", "indication"}


def test_bad_span_names_are_one_clear_error():
    with pytest.raises(SpecError, match="entity span 'my drug'.*name of a template field"):
        paper_specs(entity="my drug")
    with pytest.raises(SpecError, match="must be different fields"):
        paper_specs(entity="drug", title="drug")


def test_a_sweep_config_names_the_entity_and_runs_the_main_grid(tmp_path):
    facts = _jsonl(tmp_path / "drugs.jsonl", DRUGS)
    config = SweepConfig.model_validate({
        "models": [{"name": "tiny", "tiny": "llama", "tiny_layers": 4}], "spans": {"entity": "drug"},
        "data": {"facts": str(facts), "templates": [DRUG_TEMPLATE], "answer_field": "maker"},
        "grid": ["main", "selective"], "check_baselines": 2})
    specs = resolve_specs(config)
    assert {s.name for s in specs} == set(PAPER_GRIDS["main"]) | set(PAPER_GRIDS["selective"])
    outcome = run_sweep(config, output=tmp_path / "out", show_progress=False)
    rows = load_results(outcome.results)
    assert {r["spec"] for r in rows} == {s.name for s in specs} and len(rows) == len(specs) * len(DRUGS)
    manifest = load_manifest(outcome.results)
    assert manifest["sweep"]["spans"]["entity"] == "drug"
    assert manifest["specs"]["not_fe"]["spec"]["rules"][0]["positions"] == [{"not": [{"span": "drug"}]}]
    assert all(r["ok"] for r in outcome.baseline_check.values())
    # the fe_lt rows are the grafter's own numbers for the drug spec
    P, F, tok = tiny_pair("llama", n_layers=4)
    g = Grafter(P, F, tok)
    fe_lt = {r["fact_id"]: r for r in rows if r["spec"] == "fe_lt"}
    for fact in DRUGS:
        prompt = DRUG_TEMPLATE.format(**fact)
        logits = g.run(paper_specs(entity="drug")["fe_lt"], [prompt], [{"drug": fact["drug"]}]).logits[0].float()
        target = tok(prompt + " " + fact["maker"])["input_ids"][len(tok(prompt)["input_ids"])]
        prob = torch.softmax(logits, -1)[target].item()
        assert fe_lt[fact["id"]]["prob"] == pytest.approx(prob, abs=1e-6)


def _doc_command() -> list[str]:
    """The ``nngraft run --grid …`` command of docs/study.md, as argv (after ``nngraft``)."""
    text = (ROOT / "docs" / "study.md").read_text()
    section = text[text.index("### The paper's grids on your facts"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)[1]
    return shlex.split(block.replace("\\\n", " "))[1:]


def test_cli_runs_the_paper_grids_on_drug_facts_with_one_flag(tmp_path, capsys, monkeypatch):
    facts = _jsonl(tmp_path / "drugs.jsonl", DRUGS)
    monkeypatch.chdir(tmp_path)
    doc = _doc_command()  # the docs' command, with a tiny pair for smollm2 and its F
    i = doc.index("--model")
    assert doc[i:i + 4] == ["--model", "smollm2", "--donor", "runs/sft/drugs"]
    assert main([*doc[:i], "--tiny", "llama", *doc[i + 4:], "--no-progress"]) == 0
    doc_rows = load_results(tmp_path / "runs" / "drugs")
    assert {r["spec"] for r in doc_rows} == (set(PAPER_GRIDS["main"]) | set(PAPER_GRIDS["components"])
                                            | set(PAPER_GRIDS["lm_head"]))
    base = ["run", "--tiny", "llama", "--facts", str(facts), "--template", DRUG_TEMPLATE,
            "--answer-field", "maker", "--no-progress"]
    # without the flag: one clear error that names the flag
    assert main([*base, "--grid", "main"]) == 2
    err = capsys.readouterr().err
    assert "no span ['first_actor']" in err and "--entity FIELD" in err and "Traceback" not in err
    code = main([*base, "--grid", "main", "--grid", "components", "--grid", "lm_head", "--spec", "fe_lt_selective",
                 "--entity", "drug", "-o", str(tmp_path / "out")])
    assert code == 0
    rows = load_results(tmp_path / "out")
    names = set(PAPER_GRIDS["main"]) | set(PAPER_GRIDS["components"]) | set(PAPER_GRIDS["lm_head"]) | {"fe_lt_selective"}
    assert {r["spec"] for r in rows} == names
    specs = load_manifest(tmp_path / "out")["specs"]
    assert specs["fe_lt_selective"]["spec"]["rules"][0]["positions"] == [{"span": "drug"}]
    assert specs["fe+lm_head"]["hash"] == paper_specs(entity="drug")["fe+lm_head"].content_hash()


def test_cli_movie_grid_on_inventor_facts_with_the_city_as_title(tmp_path):
    facts = _jsonl(tmp_path / "inventors.jsonl", INVENTORS)
    code = main(["run", "--tiny", "gpt2", "--facts", str(facts), "--template", INVENTOR_TEMPLATE,
                 "--answer-field", "device", "--grid", "movie", "--entity", "inventor", "--title-span", "city",
                 "-o", str(tmp_path / "out"), "--no-progress", "--quiet"])
    assert code == 0
    rows = load_results(tmp_path / "out")
    assert {r["spec"] for r in rows} == set(PAPER_GRIDS["movie"])
    spec = load_manifest(tmp_path / "out")["specs"]["fe_m_lt"]["spec"]
    assert spec["rules"][0]["positions"] == [{"span": "inventor"}, {"span": "city"}, {"last": True}]


def test_sweep_cli_flag_overrides_the_config(tmp_path):
    facts = _jsonl(tmp_path / "inventors.jsonl", INVENTORS)
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({
        "name": "inv", "models": [{"name": "tiny", "tiny": "llama"}],
        "data": {"facts": "inventors.jsonl", "templates": [INVENTOR_TEMPLATE], "answer_field": "device"},
        "grid": "main", "output": "out", "check_baselines": 0}))
    assert main(["sweep", str(config), "--no-progress", "--quiet"]) == 2  # first_actor: not a field
    assert main(["sweep", str(config), "--entity", "inventor", "--no-progress", "--quiet"]) == 0
    rows = load_results(tmp_path / "out")
    assert {r["spec"] for r in rows} == set(PAPER_GRIDS["main"]) and len(rows) == 8 * len(INVENTORS)
    assert facts.exists()


def test_finetune_validate_scores_a_held_out_phrasing_every_epoch(tmp_path, capsys):
    """``nngraft finetune --validate TEMPLATE --answer-field FIELD``: every epoch scored on the
    held-out phrasing, printed and recorded; the scores are the finetuned model's own."""
    from nngraft.study.finetune import load_finetuned
    from nngraft.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("gpt2")
    tiny_model("llama", n_layers=2, vocab_size=len(tok)).save_pretrained(tmp_path / "P")
    tok.save_pretrained(tmp_path / "P")
    facts = _jsonl(tmp_path / "drugs.jsonl", DRUGS)
    (tmp_path / "bio.txt").write_text("{drug} is made by {maker}.\n{maker} makes {drug}.\n")
    held_out = "{drug} is produced by"
    assert main(["finetune", "--model", str(tmp_path / "P"), "--facts", str(facts), "--templates",
                 str(tmp_path / "bio.txt"), "--out", str(tmp_path / "F"), "--preset", "cpu-fast", "--epochs", "3",
                 "--validate", held_out, "--answer-field", "maker", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "F" / "finetune-manifest.json").read_text())
    history = manifest["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert manifest["validate"] == {"template": held_out, "answer_field": "maker", "n": len(DRUGS)}
    for h in history:
        assert 0 <= h["val_top1"] <= 1 and 0 <= h["val_target_prob"] <= 1
        assert f"epoch {h['epoch']}: train loss" in printed and f"mean p(answer) {h['val_target_prob']:.3f}" in printed
    # the last epoch's score is the saved model's own on the held-out prompts
    F, ftok = load_finetuned(tmp_path / "F"), tok
    probs = []
    for fact in DRUGS:
        prompt = held_out.format(**fact)
        n = len(ftok(prompt)["input_ids"])
        target = ftok(prompt + " " + fact["maker"])["input_ids"][n]
        with torch.no_grad():
            logits = F(torch.tensor([ftok(prompt)["input_ids"]])).logits[0, -1].float()
        probs.append(torch.softmax(logits, -1)[target].item())
    assert history[-1]["val_target_prob"] == pytest.approx(sum(probs) / len(probs), abs=1e-4)
    (tmp_path / "texts.txt").write_text("Zolvatrin is made by Harlow Labs.\n")
    assert main(["finetune", "--model", str(tmp_path / "P"), "--texts", str(tmp_path / "texts.txt"), "--out",
                 str(tmp_path / "F2"), "--validate", held_out, "--no-progress"]) == 2
    assert "--validate renders a template over facts" in capsys.readouterr().err


def test_a_subset_of_specs_matches_the_full_run_within_float_rounding(tmp_path):
    """docs/study.md: rows computed in other batches agree to float rounding (< 1e-5), not bit for bit."""
    facts = _jsonl(tmp_path / "drugs.jsonl", DRUGS)
    data = {"facts": str(facts), "templates": [DRUG_TEMPLATE], "answer_field": "maker"}
    full = SweepConfig.model_validate({"models": [{"name": "tiny", "tiny": "llama"}], "spans": {"entity": "drug"},
                                       "data": data, "grid": ["main", "components"], "check_baselines": 0,
                                       "batch_size": 7})
    subset = full.model_copy(update={"grid": None, "specs": []})
    subset = SweepConfig.model_validate({**subset.model_dump(), "grid": "main", "batch_size": 3})
    rows = {}
    for name, config in (("full", full), ("subset", subset)):
        out = run_sweep(config, output=tmp_path / name, show_progress=False)
        rows[name] = {(r["spec"], r["fact_id"]): r["prob"] for r in load_results(out.results)}
    shared = set(rows["subset"])
    assert shared <= set(rows["full"]) and len(shared) == 8 * len(DRUGS)
    assert max(abs(rows["full"][k] - rows["subset"][k]) for k in shared) < 1e-5


def test_data_show_prints_tokens_spans_and_targets(tmp_path, capsys):
    from nngraft.compile.tokens import tokenize_prompt
    from nngraft.result import target_token_id
    from nngraft.testing import tiny_tokenizer

    facts = _jsonl(tmp_path / "drugs.jsonl", DRUGS)
    assert main(["data", "show", str(facts), "--template", DRUG_TEMPLATE, "--answer-field", "maker",
                 "--tokenizer", "tiny-llama", "--limit", "1"]) == 0
    shown = capsys.readouterr().out
    tok = tiny_tokenizer("llama")
    prompt = DRUG_TEMPLATE.format(**DRUGS[0])
    ids = tokenize_prompt(tok, prompt, {"drug": DRUGS[0]["drug"]})
    assert "tokens  " + " ".join(f"{i}:{tok.decode([t])!r}" for i, t in enumerate(ids.ids)) in shown
    assert f"span drug: tokens {list(ids.spans['drug'])}" in shown
    target = target_token_id(tok, prompt, DRUGS[0]["maker"])
    assert f"target  id {target} = {tok.decode([target])!r}" in shown


def test_finetune_logs_one_line_per_epoch_when_output_is_not_a_terminal():
    """Progress to a log file: no bar, but epoch, step and elapsed time after every epoch."""
    import io

    from rich.console import Console

    from nngraft.study.finetune import CPU_FAST, finetune
    from nngraft.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("llama")
    model = tiny_model("llama", vocab_size=len(tok))
    log = io.StringIO()
    result = finetune(model, tok, ["Zolvatrin is made by Harlow Labs."] * 4, config=CPU_FAST.replace(epochs=2),
                      progress=Console(file=log, force_terminal=False, width=200))
    lines = [line for line in log.getvalue().splitlines() if line.startswith("finetuning: epoch")]
    assert len(lines) == 2 and lines[0].startswith("finetuning: epoch 1/2, step 1/2, epoch ")
    assert lines[1].startswith("finetuning: epoch 2/2, step 2/2, epoch ") and " s, elapsed " in lines[1]
    assert len(result.history) == 2
