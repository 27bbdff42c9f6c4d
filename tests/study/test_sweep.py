"""Sweeps end to end on tiny models: spec files, results + manifest + plots, baselines equal plain
P and F, resuming after a kill gives identical results, and the errors that guard resumes."""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from pathlib import Path

import pytest
import torch

from nngraft import GraftSpec, Grafter
from nngraft.arch import adapter_for
from nngraft.compile.plan import compile_plan
from nngraft.result import target_token_id
from nngraft.study.examples import TestExample
from nngraft.study.grids import PAPER_GRIDS, paper_specs, spec_file_name, with_lm_head
from nngraft.study.results import (ResultsError, ResultsWriter, TruncatedResultsWarning, load_manifest,
                                   load_results)
from nngraft.study.sweep import (SweepConfig, SweepConfigError, evaluate, load_sweep_config, plan_batches,
                                 resolve_specs, run_sweep, save_examples_jsonl, spec_role)
from nngraft.testing import tiny_pair

from tests.helpers.recipe_loader import load_recipe
from tests.helpers import ROOT
from tests.helpers.examples import TWO_FACTS

SPEC_DIR = ROOT / "recipes" / "specs"

EXAMPLES = [
    *TWO_FACTS,
    TestExample("f3", "s3", "Keanu Reeves stars in The Matrix alongside",
                {"first_actor": "Keanu Reeves", "movie_title": "The Matrix"}, "Carrie-Anne Moss"),
    TestExample("f1", "q", "Q: Who stars with Ada Lovelace in a movie? A: An actor named",
                {"first_actor": "Ada Lovelace"}, "Alan Turing"),
]


# ---------------------------------------------------------------------------------------------
# Shipped specs
# ---------------------------------------------------------------------------------------------


def test_shipped_spec_files_are_exactly_the_paper_specs():
    specs = paper_specs()
    files = sorted(SPEC_DIR.rglob("*.json"))
    assert {str(f.relative_to(SPEC_DIR)) for f in files} == {spec_file_name(n) for n in specs}
    for name, spec in specs.items():
        assert GraftSpec.load(SPEC_DIR / spec_file_name(name)) == spec, name
    for grid, names in PAPER_GRIDS.items():
        assert set(names) <= set(specs), grid
        assert names[:2] == ["p", "f"], grid


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama"])
def test_every_shipped_spec_compiles_on_tiny_models(model_type):
    P, _, tok = tiny_pair(model_type, n_layers=8)  # eighths need at least 8 layers
    g = Grafter(P, P, tok)
    prompt = "Ada Lovelace stars in The Engine alongside"
    spans = {"first_actor": "Ada Lovelace", "movie_title": "The Engine", "relation": "stars"}
    tokenized = g.tokenize([prompt], [spans])
    for path in sorted(SPEC_DIR.rglob("*.json")):
        spec = GraftSpec.load(path)
        plan = compile_plan([spec], adapter_for(P), P.config, tokenized)
        assert plan.is_empty == (spec.name == "p"), path


def test_spec_semantics():
    specs = paper_specs()
    assert spec_role(specs["p"]) == "p" and spec_role(specs["f"]) == "f" and spec_role(specs["fe"]) == "graft"
    assert specs["lt_attn"].rules[0].components == ["q", "k", "v"]  # the paper's "attn" excludes o
    assert specs["lt_ffn"].rules[0].components == ["mlp"]
    assert specs["fe_lt_complement"].rules[0].positions[0].not_ == specs["fe_lt"].rules[0].positions
    assert specs["fe_lt_selective"].rules[1].layers == "second_half"
    head = with_lm_head(specs["fe"], "last_token")
    assert head.name == "fe+lm_head" and head.rules[-1].components == ["lm_head"]
    assert head.rules[-1].positions[0].model_dump() == {"last": True}
    assert with_lm_head(specs["fe"], "never") is specs["fe"]


def test_lm_head_last_token_equals_always_and_grafts_the_head(tmp_path):
    P, F, tok = tiny_pair("gpt_neox")  # untied head, so grafting it changes only the unembedding
    g = Grafter(P, F, tok)
    base = paper_specs()["lt"]
    specs = [base, with_lm_head(base, "last_token"), with_lm_head(base, "always")]
    res = g.run_grid(specs, [EXAMPLES[0].prompt], [EXAMPLES[0].spans])
    last, always = res["lt+lm_head"].logits, res["lt+lm_head_all"].logits
    torch.testing.assert_close(last, always)
    assert not torch.allclose(res["lt"].logits, last)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _config(tmp_path: Path, **extra) -> SweepConfig:
    save_examples_jsonl(EXAMPLES, tmp_path / "examples.jsonl")
    raw = {"name": "t", "models": [{"name": "tiny", "tiny": "llama"}], "data": {"examples": "examples.jsonl"},
           "grid": "main", "specs": [str(SPEC_DIR / "lt_ffn.json")], "batch_size": 5, "output": "out",
           "base_dir": str(tmp_path), **extra}
    return SweepConfig.model_validate(raw)


def _direct_prob(model, tok, example: TestExample) -> float:
    ids = tok(example.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return float(torch.softmax(logits.float(), -1)[target_token_id(tok, example.prompt, example.answer)])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    config = _config(tmp)
    outcome = run_sweep(config, show_progress=False)
    return config, outcome, load_results(outcome.results)


def test_sweep_writes_rows_manifest_and_checks_baselines(finished):
    config, outcome, rows = finished
    spec_names = [s.name for s in resolve_specs(config)]
    assert spec_names == PAPER_GRIDS["main"] + ["lt_ffn"]
    assert len(rows) == len(spec_names) * len(EXAMPLES)
    assert {(r["spec"], r["example"]) for r in rows} == {(s, e.key) for s in spec_names for e in EXAMPLES}
    row = rows[0]
    for key in ("model", "spec", "spec_hash", "example", "fact_id", "template", "target_id", "target_text",
                "prob", "logprob", "rank", "top_1", "top_5", "top_10", "top_100", "top_tokens"):
        assert key in row
    manifest = load_manifest(outcome.results)
    assert manifest["versions"]["torch"] == importlib.metadata.version("torch")
    assert manifest["versions"]["nngraft"] == importlib.metadata.version("nngraft")
    assert set(manifest["specs"]) == set(spec_names)
    assert manifest["specs"]["p"]["role"] == "p" and manifest["specs"]["f"]["role"] == "f"
    assert manifest["specs"]["fe"]["hash"] == paper_specs()["fe"].content_hash()
    ident = manifest["models"]["tiny"]
    assert ident["recipient"]["config_hash"] == ident["donor"]["config_hash"]
    assert ident["recipient"]["weights_fingerprint"] != ident["donor"]["weights_fingerprint"]
    assert manifest["dataset"]["n_examples"] == 4 and manifest["dataset"]["n_facts"] == 3
    assert manifest["baseline_check"]["tiny"]["ok"] is True
    assert manifest["runs"][-1]["rows_written"] == len(rows)


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_pair("llama")


def test_p_rows_equal_plain_p_and_f_rows_equal_f(finished, tiny_llama):
    _, _, rows = finished
    P, F, tok = tiny_llama
    by = {(r["spec"], r["example"]): r for r in rows}
    for ex in EXAMPLES:
        p, f = by[("p", ex.key)], by[("f", ex.key)]
        assert p["target_id"] == target_token_id(tok, ex.prompt, ex.answer)
        assert p["prob"] == pytest.approx(_direct_prob(P, tok, ex), abs=1e-6)
        assert f["prob"] == pytest.approx(_direct_prob(F, tok, ex), abs=1e-6)
        assert p["prob"] != pytest.approx(f["prob"], abs=1e-6)  # the test can tell them apart


def test_rank_and_hits_match_an_independent_computation(finished, tiny_llama):
    _, _, rows = finished
    P, F, tok = tiny_llama
    g = Grafter(P, F, tok)
    ex = EXAMPLES[1]
    logits = g.run(paper_specs()["fe_lt"], [ex.prompt], [ex.spans]).logits[0].float()
    probs = torch.softmax(logits, -1)
    row = next(r for r in rows if r["spec"] == "fe_lt" and r["example"] == ex.key)
    target = row["target_id"]
    assert row["prob"] == pytest.approx(float(probs[target]), abs=1e-6)
    assert row["rank"] == int((probs > probs[target]).sum())
    assert row["top_5"] == (row["rank"] < 5)
    assert row["top_tokens"][0] == tok.decode([int(probs.argmax())])


def test_plots_from_the_sweep(finished, tmp_path):
    from nngraft.study.plot import plot_results

    _, outcome, _ = finished
    paths = plot_results(outcome.results, tmp_path / "plots")
    names = {p.name for p in paths}
    assert "aggregates.csv" in names
    for stem in ("bars_positions_tiny_s3", "bars_positions_tiny_q", "bars_positions_tiny_all-templates"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    for p in paths:
        assert p.stat().st_size > 1000
    csv_lines = (tmp_path / "plots" / "aggregates.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,template,spec,n_facts,n_examples,prob,prob_low,prob_high")


def test_heatmaps_for_layer_groups(tmp_path):
    from nngraft.study.plot import plot_results

    config = _config(tmp_path, models=[{"name": "tiny4", "tiny": "gpt2", "tiny_layers": 4}],
                     data={"examples": "examples.jsonl", "limit": 1}, grid=None, specs=[str(SPEC_DIR / "layers" / f"lt_ffn_{q}.json")
                                       for q in ("first_quarter", "second_quarter", "third_quarter", "fourth_quarter")])
    outcome = run_sweep(config, show_progress=False)
    names = {p.name for p in plot_results(outcome.results)}
    assert len(load_results(outcome.results)) == 6 * 2  # p, f and 4 quarters × fact f1's 2 examples
    assert "heatmap_tiny4_s3_LT_quarter.png" in names and "heatmap_tiny4_s3_LT_quarter.svg" in names


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------


def _canonical(rows):
    return sorted((json.dumps(r, sort_keys=True) for r in rows))


def test_resume_after_a_kill_mid_write_gives_identical_results(finished, tmp_path):
    _, full, full_rows = finished
    config = _config(tmp_path)
    out = config.output_dir()
    out.mkdir(parents=True)
    lines = Path(full.results).read_text().splitlines(keepends=True)
    # the run was killed after 13 rows, in the middle of writing the 14th (its manifest, written
    # before any row, records the model: rows no manifest vouches for are refused)
    (out / "results.jsonl").write_text("".join(lines[:13]) + lines[13][: len(lines[13]) // 2])
    (out / "manifest.json").write_text(Path(full.manifest).read_text())
    with pytest.warns(TruncatedResultsWarning, match="incomplete last line"):
        outcome = run_sweep(config, show_progress=False)
    assert outcome.stats["tiny"].skipped == 13
    assert outcome.stats["tiny"].written == len(full_rows) - 13
    assert _canonical(load_results(outcome.results)) == _canonical(full_rows)
    # a third run has nothing left to do
    again = run_sweep(config, show_progress=False)
    assert again.stats["tiny"].written == 0 and again.stats["tiny"].skipped == len(full_rows)


def test_resume_after_an_interrupt_between_batches(finished, tmp_path):
    _, _, full_rows = finished
    config = _config(tmp_path)
    P, F, tok = tiny_pair("llama")
    specs = resolve_specs(config)
    calls = []

    def stop_after_two(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    writer = ResultsWriter(config.output_dir())
    with pytest.raises(KeyboardInterrupt):
        evaluate(Grafter(P, F, tok), specs, EXAMPLES, model="tiny", writer=writer, batch_size=5,
                 progress=stop_after_two)
    writer.close()
    (config.output_dir() / "manifest.json").write_text(Path(finished[1].manifest).read_text())  # as a sweep writes it
    saved = sum(calls)  # the two finished batches (P and F rows come first, in their own batches)
    assert saved > 0 and len(load_results(config.output_dir())) == saved
    outcome = run_sweep(config, show_progress=False)
    assert outcome.stats["tiny"].written == len(full_rows) - saved
    assert _canonical(load_results(outcome.results)) == _canonical(full_rows)


def test_batches_do_not_depend_on_what_is_done():
    specs = list(paper_specs().values())[:3]
    batches = plan_batches(specs, [5, 3, 4], 4)
    assert [u for b in batches for u in b] == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2),
                                                (0, 0), (1, 0), (2, 0)]
    assert [len(b) for b in batches] == [4, 4, 1]


def test_resume_refuses_changed_spec_data_or_model(finished, tmp_path):
    _, full, _ = finished
    config = _config(tmp_path)
    out = config.output_dir()
    out.mkdir(parents=True)
    for name in ("results.jsonl", "manifest.json"):
        (out / name).write_bytes((Path(full.results).parent / name).read_bytes())
    changed = tmp_path / "lt_ffn.json"
    GraftSpec(name="lt_ffn", rules=paper_specs()["lt_o"].rules).save(changed)
    with pytest.raises(ResultsError, match="spec 'lt_ffn' with hash .* the spec changed"):
        run_sweep(_config(tmp_path, specs=[str(changed)]), show_progress=False)
    edited = [TestExample(e.fact_id, e.template, e.prompt, e.spans, "Someone Else") for e in EXAMPLES]
    save_examples_jsonl(edited, tmp_path / "edited.jsonl")
    with pytest.raises(ResultsError, match="The data changed"):
        run_sweep(_config(tmp_path, data={"examples": "edited.jsonl"}), show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["models"]["tiny"]["donor"]["weights_fingerprint"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResultsError, match="donor weights_fingerprint"):
        run_sweep(config, show_progress=False)


def _last_element_changed(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[-1].mlp.down_proj.weight.view(-1)[-1] += 1e-3  # the very last value only
    return other


def test_weights_fingerprint_sees_every_value():
    import hashlib

    from nngraft.donors.loading import weights_fingerprint
    from nngraft.study.provenance import FINGERPRINT_VERSION, model_identity

    P, F, _ = tiny_pair("llama")
    Q = _last_element_changed(F)
    a, b = model_identity(F, "F"), model_identity(Q, "F")
    assert a["fingerprint_version"] == b["fingerprint_version"] == FINGERPRINT_VERSION == 2
    assert a["weights_fingerprint"] == weights_fingerprint(F) and len(a["weights_fingerprint"]) == 64
    assert a["weights_fingerprint"] != b["weights_fingerprint"]
    assert model_identity(_last_element_changed(F), "x")["weights_fingerprint"] == b["weights_fingerprint"]
    assert {k: v for k, v in a.items() if k != "weights_fingerprint"} == {
        k: v for k, v in b.items() if k != "weights_fingerprint"}  # nothing else tells them apart

    def first_64(model):  # the old fingerprint (version 1): it could not tell F from Q
        digest = hashlib.sha256()
        for name, param in model.named_parameters():
            digest.update(name.encode() + str(tuple(param.shape)).encode()
                          + param.detach().reshape(-1)[:64].float().numpy().tobytes())
        return digest.hexdigest()[:16]

    assert first_64(F) == first_64(Q)


@pytest.fixture()
def saved_pair(tmp_path):
    """P and F saved as folders, and a config (main grid, 2 examples) that sweeps them."""
    P, F, tok = tiny_pair("llama")
    for name, model in (("P", P), ("F", F)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    save_examples_jsonl(EXAMPLES[:2], tmp_path / "two.jsonl")
    config = _config(tmp_path, models=[{"name": "m", "recipient": "P", "donor": "F"}], specs=[],
                     data={"examples": "two.jsonl"})
    return config, F, tok


def test_resume_refuses_a_donor_changed_only_in_its_last_value(saved_pair, tmp_path):
    config, F, tok = saved_pair
    first = run_sweep(config, show_progress=False)
    text = Path(first.results).read_text()
    _last_element_changed(F).save_pretrained(tmp_path / "F")
    with pytest.raises(ResultsError, match=r"holds results for model 'm' whose donor weights_fingerprint was "
                                           r"'[0-9a-f]{64}'; this run's is '[0-9a-f]{64}'\. Use a new output"):
        run_sweep(config, show_progress=False)
    assert Path(first.results).read_text() == text  # nothing was added


def test_resume_of_an_old_fingerprint_manifest_is_refused_with_the_reason(saved_pair, tmp_path):
    config, _, _ = saved_pair
    first = run_sweep(config, show_progress=False)
    manifest_file = Path(first.manifest)
    manifest = json.loads(manifest_file.read_text())
    for side in ("recipient", "donor"):  # as nngraft wrote it before fingerprint_version 2
        record = manifest["models"]["m"][side]
        del record["fingerprint_version"]
        record["weights_fingerprint"] = record["weights_fingerprint"][:16]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ResultsError) as error:
        run_sweep(config, show_progress=False)
    assert str(error.value) == (
        f"{first.results} holds results for model 'm' recorded by an older nngraft, whose weight fingerprint "
        "covered only the first 64 values of each tensor; this nngraft hashes every byte of the weights "
        "(fingerprint_version 2), so it cannot confirm that this run's recipient is the model that made those "
        f"rows. Use a new output directory; or, if you are sure the models are the same, delete \"models\" → "
        f"'m' from {manifest_file} and rerun to record them anew")
    # following the message's second way: the run resumes (nothing to redo) and records version 2
    manifest = json.loads(manifest_file.read_text())
    del manifest["models"]["m"]
    manifest_file.write_text(json.dumps(manifest))
    again = run_sweep(config, show_progress=False)
    assert again.stats["m"].written == 0 and again.stats["m"].skipped == len(load_results(first.results))
    assert load_manifest(first.results)["models"]["m"]["donor"]["fingerprint_version"] == 2


def test_missing_span_fails_before_any_forward(tmp_path):
    config = _config(tmp_path, grid=None, specs=[str(SPEC_DIR / "r.json")])
    with pytest.raises(Exception, match=r"has no span \['relation'\].*specs \['r'\]"):
        run_sweep(config, show_progress=False)
    assert not (config.output_dir() / "results.jsonl").exists()  # refused before loading any model


# ---------------------------------------------------------------------------------------------
# Results files and configs
# ---------------------------------------------------------------------------------------------


def test_load_results_drops_a_cut_line_and_rejects_a_damaged_middle(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    with pytest.warns(TruncatedResultsWarning):
        assert load_results(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": 2}')  # valid JSON but no newline: cut right before it
    with pytest.warns(TruncatedResultsWarning):
        assert load_results(path) == [{"a": 1}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ResultsError, match="line 2 is not a JSON object"):
        load_results(path)
    with pytest.raises(ResultsError, match="no results file"):
        load_results(tmp_path / "nothing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path.write_text('{"a": 1}\n\n{"a": 2}\n')
        assert load_results(path) == [{"a": 1}, {"a": 2}]


def test_writer_truncates_the_cut_line_before_appending(tmp_path):
    path = tmp_path / "results.jsonl"
    row = {"model": "m", "spec": "s", "example": "e1"}
    path.write_text(json.dumps(row) + '\n{"model": "m", "sp')
    with pytest.warns(TruncatedResultsWarning):
        writer = ResultsWriter(path)
    assert set(writer.done) == {("m", "s", "e1")}
    writer.append([dict(row, example="e2")])
    writer.close()
    assert [r["example"] for r in load_results(path)] == ["e1", "e2"]


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "x", "recipient": "a"}], "data": {"examples": "e.jsonl"},
                               "grid": "main"}))
    with pytest.raises(SweepConfigError, match="models\\[0\\].*give both 'recipient' and 'donor'"):
        load_sweep_config(bad)
    bad.write_text(json.dumps({"models": [{"name": "x", "tiny": "llama"}], "data": {"examples": "e.jsonl"}}))
    with pytest.raises(SweepConfigError, match="give a 'grid'"):
        load_sweep_config(bad)
    bad.write_text("{nope")
    with pytest.raises(SweepConfigError, match="not valid JSON"):
        load_sweep_config(bad)
    bad.write_text(json.dumps({"models": [{"name": "x", "tiny": "llama"}], "data": {"examples": "e.jsonl"},
                               "grid": "nope"}))
    with pytest.raises(Exception, match="unknown grid 'nope'"):
        resolve_specs(load_sweep_config(bad))
    with pytest.raises(SweepConfigError, match="exactly one of 'examples', 'facts' or 'dataset'"):
        load_sweep_config(_write(tmp_path, {"models": [{"name": "x", "tiny": "llama"}], "grid": "main",
                                            "data": {"examples": "e.jsonl", "facts": "f.jsonl"}}))


def _write(tmp_path, raw):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return path


def test_sweep_from_a_built_in_dataset(tmp_path):
    config = SweepConfig.model_validate({
        "models": [{"name": "tiny", "tiny": "gpt2"}], "grid": "relation", "batch_size": 16,
        "data": {"dataset": "fake_movies_real_actors", "n": 3, "seed": 1,
                 "templates": [{"template": "{first_actor} {relation} in a movie alongside", "name": "s1_r",
                                "values": {"relation": "stars"}}]},
        "output": str(tmp_path / "out")})
    outcome = run_sweep(config, show_progress=False)
    rows = load_results(outcome.results)
    assert len(rows) == len(PAPER_GRIDS["relation"]) * 3
    assert {r["template"] for r in rows} == {"s1_r"}
    assert load_manifest(outcome.results)["dataset"]["facts_hash"]


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

RECIPES = ["components", "layer_groups", "lm_head", "main_grid", "movie_span", "real_movies", "relation_span",
           "selective_layers"]  # the paper's experiments (other recipes have their own tests)


def _recipe(name):
    return load_recipe(name)


def test_recipes_cover_the_paper_experiments():
    assert set(RECIPES) <= {p.stem for p in SPEC_DIR.parent.glob("*.py")}
    reproduce = (SPEC_DIR.parents[1] / "docs" / "reproduce.md").read_text()
    for name in RECIPES:
        assert f"recipes/{name}.py" in reproduce, name  # every recipe is mapped to a paper result


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_dry_run_resolves_specs_data_and_spans(name, tmp_path, capsys):
    assert _recipe(name).main(["--tiny", "--n", "3", "--dry-run", "-o", str(tmp_path / "out")]) == 0
    assert "rows →" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recipe_runs_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert _recipe("main_grid").main(["--tiny", "gpt2", "--n", "2", "--no-plot", "--no-progress",
                                      "-o", str(out)]) == 0
    rows = load_results(out)
    assert len(rows) == len(PAPER_GRIDS["main"]) * 2 * 4  # 8 specs × 2 facts × 4 sentences
    assert "tiny-gpt2 — sentence_3" in capsys.readouterr().out


def test_recipe_without_models_is_an_error(capsys):
    assert _recipe("main_grid").main(["--dry-run"]) == 1
    assert "give --model and --donor" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Whole-answer log-probability
# ---------------------------------------------------------------------------------------------


def _full_logprob(grafter, spec, prompt, answer_ids):
    """Reference: one full forward of prompt + answer tokens (no cache), summing the answer terms."""
    from nngraft.compile.tokens import TokenizedPrompt

    [p] = grafter.tokenize([prompt.prompt], [prompt.spans])
    joined = TokenizedPrompt(p.text, p.ids + tuple(answer_ids), p.spans)
    logits = grafter.run_rows([spec], [joined], all_logits=True).all_logits[0].float()
    logp = torch.log_softmax(logits, -1)
    start = len(p) - 1
    return sum(float(logp[start + j, t]) for j, t in enumerate(answer_ids))


def test_answer_logprob_equals_full_teacher_forced_forwards(tmp_path):
    from nngraft import Index
    from nngraft.study.answer import answer_token_ids

    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    specs = paper_specs()
    stats = evaluate(g, [specs["p"], specs["f"], specs["fe"], specs["lt"]], EXAMPLES[:2], answer_logprob=True)
    rows = {(r["spec"], r["example"]): r for r in stats.rows}
    for ex in EXAMPLES[:2]:
        ids = answer_token_ids(tok, ex.prompt, ex.answer)
        assert len(ids) > 1 and ids[0] == rows[("p", ex.key)]["target_id"]
        n = len(tok(ex.prompt)["input_ids"])
        # the new tokens are grafted by "last" (every new token), never by a prompt span
        lt_cells = GraftSpec(name="lt_ref", rules=[specs["lt"].rules[0].model_copy(
            update={"positions": [Index(index=list(range(n - 1, n - 1 + len(ids))))]})])
        refs = {"p": _full_logprob(g, specs["p"], ex, ids), "f": _full_logprob(g, specs["f"], ex, ids),
                "fe": _full_logprob(g, specs["fe"], ex, ids), "lt": _full_logprob(g, lt_cells, ex, ids)}
        for name, ref in refs.items():
            row = rows[(name, ex.key)]
            assert row["answer_tokens"] == len(ids)
            assert row["answer_logprob"] == pytest.approx(ref, abs=1e-4), name
            assert row["answer_logprob"] < row["logprob"]  # later tokens only add negative terms
    # plain P with no nngraft at all
    ex = EXAMPLES[0]
    ids = answer_token_ids(tok, ex.prompt, ex.answer)
    full = torch.tensor([tok(ex.prompt)["input_ids"] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(P(input_ids=full).logits[0].float(), -1)
    n = full.shape[1] - len(ids)
    plain = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(ids))
    assert rows[("p", ex.key)]["answer_logprob"] == pytest.approx(plain, abs=1e-4)


def test_shipped_sweep_configs_validate():
    from nngraft.study.sweep import check_spans, load_data

    configs = sorted((SPEC_DIR.parent / "sweeps").glob("*.json"))
    assert {c.stem for c in configs} >= {"tiny", "main", "layers"}
    for path in configs:
        config = load_sweep_config(path)
        specs = resolve_specs(config)
        assert [s.name for s in specs][:2] == ["p", "f"]
        if path.stem == "tiny":
            examples, _ = load_data(config)
            check_spans(specs, examples)
            assert len(examples) == 16


def test_to_dataframe_without_pandas_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    from nngraft.study.results import to_dataframe

    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ModuleNotFoundError("No module named 'pandas'", name="pandas")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ResultsError, match=r'pip install "nngraft\[pandas\]"'):
        to_dataframe([{"a": 1}])


def test_sweep_loads_models_from_local_folders(tmp_path):
    P, F, tok = tiny_pair("gpt_neox")
    for name, model in (("P", P), ("F", F)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    config = _config(tmp_path, models=[{"name": "local", "recipient": "P", "donor": "F"}],
                     data={"examples": "examples.jsonl", "limit": 1}, grid=None,
                     specs=[str(SPEC_DIR / "lt.json")])
    outcome = run_sweep(config, show_progress=False)
    manifest = load_manifest(outcome.results)
    ident = manifest["models"]["local"]
    assert ident["recipient"]["source"] == str(tmp_path / "P") and ident["donor"]["source"] == str(tmp_path / "F")
    assert ident["recipient"]["model_type"] == "gpt_neox" and ident["recipient"]["dtype"] == "float32"
    assert manifest["baseline_check"]["local"]["ok"] is True
    assert manifest["seeds"]["bootstrap"] == 0
    rows = {(r["spec"], r["example"]): r for r in load_results(outcome.results)}
    ex = EXAMPLES[0]
    assert rows[("f", ex.key)]["prob"] == pytest.approx(_direct_prob(F, tok, ex), abs=1e-6)
