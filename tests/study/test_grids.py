"""nngraft.study.grids: the paper's specs and grids, for any fact schema and in their paper-exact variants.

The paper's specs and grids on facts that are not about movies: the entity span (and the title
and relation spans) are parameters of every built-in spec and grid (``paper_specs(entity="drug")``,
``--entity drug``), so a user's own fields run the whole paper grid with no hand-written spec.
Two schemas: drug → maker and inventor → device (with the city as the M span).

Paper-exact variants: the paper's layer groups (``layer_groups: "paper"``) and its configs
(embeddings at every fully grafted position, no ``down`` in the complement, F's LM head at LT on
tied-embedding models), checked against the per-token reference (tests/helpers/reference.py) with the
paper's own swaps written out by hand."""

from __future__ import annotations

import copy
import json
import re
import shlex

import pytest
import torch

from nngraft import GraftSpec, Grafter
from nngraft.arch import adapter_for
from nngraft.cli import main
from nngraft.errors import LayerRangeError, SpecError
from nngraft.spec import resolve_layers
from nngraft.study.grids import PAPER_GRIDS, grid_specs, paper_exact, paper_exact_specs, paper_specs, span_roles
from nngraft.study.results import load_manifest, load_results
from nngraft.study.sweep import SweepConfig, resolve_specs, run_sweep
from nngraft.testing import tiny_pair
from tests.helpers import ROOT
from tests.helpers.reference import component_swaps, per_token_reference

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


PROMPT = "Ada Lovelace stars in a movie alongside"
SPANS = {"first_actor": "Ada Lovelace"}


def _ranges(groups, n, how):
    out = []
    for g in groups:
        layers = resolve_layers(g, n, how)
        out.append((layers[0], layers[-1]))
    return out


def test_the_papers_quarters_put_the_remainder_in_the_last():
    quarters = ["first_quarter", "second_quarter", "third_quarter", "fourth_quarter"]
    assert _ranges(quarters, 30, "paper") == [(0, 6), (7, 13), (14, 20), (21, 29)]
    assert _ranges(quarters, 30, "even") == [(0, 6), (7, 14), (15, 21), (22, 29)]
    assert _ranges(quarters, 18, "paper") == [(0, 3), (4, 7), (8, 11), (12, 17)]  # Gemma: 4/4/4/6
    assert _ranges(quarters, 16, "paper") == _ranges(quarters, 16, "even")  # divisible by 4: the same
    assert _ranges(["first_half", "second_half"], 30, "paper") == [(0, 13), (14, 29)]


def test_the_papers_eighths_as_its_code_computed_them():
    # 30 layers, q = 7: [0, 3), [3, 7), [14, 10) = empty, [10, 14), [14, 17), [17, 21)
    assert resolve_layers("first_eighth", 30, "paper") == [0, 1, 2]
    assert resolve_layers("second_eighth", 30, "paper") == [3, 4, 5, 6]
    assert resolve_layers("fourth_eighth", 30, "paper") == [10, 11, 12, 13]
    assert resolve_layers("sixth_eighth", 30, "paper") == [17, 18, 19, 20]
    with pytest.raises(LayerRangeError, match="'third_eighth' \(the paper's layer groups\) selects no layer"):
        resolve_layers("third_eighth", 30, "paper")
    with pytest.raises(LayerRangeError, match="exposed no seventh or eighth eighth"):
        resolve_layers("seventh_eighth", 30, "paper")


def test_layer_groups_is_a_version_2_field():
    plain = paper_specs()["lt_o_fourth_quarter"]
    paper = plain.model_copy(update={"layer_groups": "paper"})
    assert json.loads(plain.to_json())["schema_version"] == "1" and "layer_groups" not in plain.to_json()
    loaded = GraftSpec.from_json(json.dumps({**json.loads(plain.to_json()), "layer_groups": "paper"}))
    assert loaded.layer_groups == "paper" and loaded.schema_version == "2"
    assert json.loads(loaded.to_json())["layer_groups"] == "paper"
    assert loaded.content_hash() != plain.content_hash() and paper.content_hash() == loaded.content_hash()
    with pytest.raises(SpecError, match="layer_groups"):
        GraftSpec.from_json(json.dumps({"name": "x", "layer_groups": "thirds", "rules": []}))
    with pytest.raises(SpecError, match="schema_version 3, written by a newer nngraft"):
        GraftSpec.from_json(json.dumps({"schema_version": "3", "name": "x", "rules": []}))


def test_paper_exact_variants_of_the_standard_specs():
    specs = paper_exact_specs(entity="drug")
    fe = specs["fe_paper"]
    assert fe.layer_groups == "paper" and [r.components for r in fe.rules] == [["embed", "all"]]
    assert [r.components for r in specs["lt_paper"].rules] == [["embed", "all"], ["lm_head"]]
    comp = specs["fe_lt_complement_paper"].rules
    assert len(comp) == 1 and "down" not in comp[0].components and "embed" in comp[0].components
    assert [r.components for r in specs["not_fe_paper"].rules][1] == ["lm_head"]  # LT is in FEᶜ
    assert specs["lt_attn_paper"].rules == paper_specs()["lt_attn"].rules  # buckets: only the layer groups
    assert [r.components for r in paper_exact(paper_specs()["lt"], tied=False).rules] == [["embed", "all"]]
    assert "fe_paper" not in {s.name for s in grid_specs("components_paper")}
    main = [s.name for s in grid_specs("main_paper", entity="drug")]
    assert main == ["p", "f"] + [n + "_paper" for n in PAPER_GRIDS["main"][2:]]
    assert "lt_o_third_eighth_paper" not in [s.name for s in grid_specs("layers_paper")]
    with pytest.raises(SpecError, match="paper-exact variants main_paper"):
        grid_specs("hybrid_paper")


def test_tied_embeddings_in_the_papers_code_swap_the_lm_head():
    """What the paper's code did: a deep copy of a tied P, F's embedding state dict loaded into it."""
    P, F, _ = tiny_pair("llama")
    copy_of_p = copy.deepcopy(P)
    copy_of_p.get_input_embeddings().load_state_dict(F.get_input_embeddings().state_dict())
    assert torch.equal(copy_of_p.get_output_embeddings().weight, F.get_output_embeddings().weight)


@pytest.mark.parametrize("name", ["fe_lt", "not_fe", "lt_o_fourth_quarter"])
def test_paper_exact_specs_match_the_per_token_reference(name):
    P, F, tok = tiny_pair("llama", n_layers=6)
    adapter = adapter_for(P)
    g = Grafter(P, F, tok)
    ids = tok(PROMPT)["input_ids"]
    fe = set(g.tokenize([PROMPT], [SPANS])[0].spans["first_actor"])
    last = len(ids) - 1

    def swaps(components, layers=range(6)):
        block, global_ = adapter.expand(list(components))
        out = [s for c in global_ for s in component_swaps(P, adapter, c, None)]
        return out + [s for c in block for layer in layers for s in component_swaps(P, adapter, c, layer)]

    no_down = ["ln_attn", "q", "k", "v", "o", "ln_mlp", "gate", "up"]  # llama: no q_norm/k_norm

    def table(t):  # the paper's swaps at token t, written out by hand
        if name == "fe_lt":
            return swaps(["embed", "all"]) + (swaps(["lm_head"]) if t == last else []) if t in fe or t == last else []
        if name == "not_fe":
            return [] if t in fe else swaps(["embed", *no_down]) + (swaps(["lm_head"]) if t == last else [])
        return swaps(["o"], layers=[3, 4, 5]) if t == last else []  # 6 layers: the paper's fourth quarter is 3-5

    expected, _ = per_token_reference(P, F, ids, table)
    spec = paper_exact(paper_specs()[name])
    actual = g.run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0]
    torch.testing.assert_close(actual[-1], expected[-1], atol=2e-5, rtol=1e-4)
    if name == "lt_o_fourth_quarter":  # and nngraft's even quarters graft another set of layers
        even = g.run(paper_specs()[name], [PROMPT], [SPANS]).logits[0]
        assert not torch.allclose(even, actual[-1], atol=1e-4)


def test_the_paper_exact_recipe_measures_each_difference_alone(tmp_path):
    from nngraft.study.results import load_results

    from tests.helpers.recipe_loader import load_recipe

    out = tmp_path / "out"
    assert load_recipe("paper_exact").main(["--tiny", "--n", "3", "--no-plot", "--no-progress", "-o", str(out)]) == 0
    rows = {(r["spec"], r["fact_id"]): r["prob"] for r in load_results(out)}
    specs = {s for s, _ in rows}
    assert {"fe_lt", "fe_lt+embed", "fe_lt_paper", "not_fe+embed-down", "fe+lt_mlp_fourth_quarter_paperq"} <= specs
    assert "fe_lt+embed-down" not in specs  # the same as fe_lt+embed: no complement, left out
    facts = {f for _, f in rows}

    def same(a, b):
        return all(abs(rows[a, f] - rows[b, f]) < 1e-6 for f in facts)

    # 6 layers: the first quarter is layer 0 both ways; the second is 1-2 (even) or 1 (paper)
    assert same("fe+lt_mlp_first_quarter", "fe+lt_mlp_first_quarter_paperq")
    assert not same("fe+lt_mlp_second_quarter", "fe+lt_mlp_second_quarter_paperq")
    assert not same("fe_lt", "fe_lt+embed") and not same("fe_lt+embed", "fe_lt_paper")  # the tied head at LT
    assert same("fe+embed", "fe_paper")  # FE is not the last token: no head, layer groups unused


def test_the_paper_md_command_runs_both_grids(tmp_path, monkeypatch):
    """docs/paper.md's `nngraft run --grid main --grid main_paper …`, with a tiny pair for the models."""
    import re
    import shlex
    from pathlib import Path

    from nngraft.cli import main
    from nngraft.study.data import make_facts, save_facts
    from nngraft.study.results import load_manifest, load_results

    text = (ROOT / "docs" / "paper.md").read_text()
    block = re.search(r"## Paper-exact variants.*?```bash\n(.*?)```", text, flags=re.S)[1]
    argv = shlex.split(block.replace("\\\n", " "))[1:]
    i = argv.index("--model")
    assert argv[i:i + 4] == ["--model", "smollm2", "--donor", "runs/sft/smollm2-fmfa"]
    monkeypatch.chdir(tmp_path)
    save_facts(make_facts("fake_movies_fake_actors", 3, 0), tmp_path / "runs/sft/smollm2-fmfa/facts.jsonl")
    assert main([*argv[:i], "--tiny", "llama", *argv[i + 4:], "-o", "out", "--no-progress", "--quiet"]) == 0
    specs = {r["spec"] for r in load_results(tmp_path / "out")}
    assert specs == set(PAPER_GRIDS["main"]) | {n + "_paper" for n in PAPER_GRIDS["main"][2:]}
    assert load_manifest(tmp_path / "out")["specs"]["fe_lt_paper"]["spec"]["layer_groups"] == "paper"
