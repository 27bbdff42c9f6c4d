"""Jupyter's view of the results (their ``_repr_html_``): short tables holding the numbers and labels
the objects hold, with user text escaped; and short reprs (never a tensor or a model)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.testing import tiny_pair
from nngraft.util.html import MAX_ROWS, html_table

PROMPTS = ["<b>Ada</b> Lovelace stars in a movie alongside", "Alan Turing & co. star in a movie alongside"]
SPANS = [{"first_actor": "<b>Ada</b> Lovelace"}, {"first_actor": "Alan Turing"}]
FE_LT = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])
LT = GraftSpec(name="lt<x>", rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])])


def cells(markup: str) -> list[str]:
    """The text of every table cell, unescaped."""
    return [html.unescape(c) for _, c in re.findall(r"<(td|th)(?: [^>]*)?>(.*?)</\1>", markup, flags=re.S)]


def caption(markup: str) -> str:
    return html.unescape(re.search(r"<caption>(.*?)</caption>", markup, flags=re.S).group(1))


def assert_escaped(markup: str) -> None:
    """No user-written tag got through: the only tags are the table's own."""
    tags = set(re.findall(r"<\s*/?\s*([A-Za-z]+)", markup))
    assert tags <= {"table", "caption", "thead", "tbody", "tr", "th", "td"}, tags


@pytest.fixture(scope="module")
def grafter():
    P, F, tok = tiny_pair("llama")
    return Grafter(P, F, tok)


def test_html_table_escapes_rounds_and_cuts():
    markup = html_table(["a<b", "x"], [[f"<i>{i}</i>", 1 / 3] for i in range(MAX_ROWS + 5)], caption="c & d")
    assert_escaped(markup)
    assert caption(markup) == "c & d"
    found = cells(markup)
    assert found[:4] == ["a<b", "x", "<i>0</i>", "0.3333"]
    assert found[-1] == "… 5 more" and f"<i>{MAX_ROWS - 1}</i>" in found and f"<i>{MAX_ROWS}</i>" not in found


def test_graft_result_html_lists_each_prompt_with_its_top_tokens(grafter):
    result = grafter.run(FE_LT, PROMPTS, SPANS)
    markup = result._repr_html_()
    assert_escaped(markup)
    assert caption(markup) == f"GraftResult: 2 prompts, vocabulary {result.logits.shape[-1]}, specs fe_lt"
    found = cells(markup)
    assert found[:4] == ["#", "spec", "prompt", "top tokens (probability)"]
    assert found[4:7] == ["0", "fe_lt", PROMPTS[0]]
    best = int(result.probs[0].argmax())
    expected = f"{grafter.tokenizer.decode([best])!r} {float(result.probs[0, best]):.3f}"
    assert found[7].startswith(expected)


def test_run_grid_returns_a_dict_shown_as_specs_by_prompts(grafter):
    grid = grafter.run_grid([FE_LT, LT], PROMPTS, SPANS)
    assert type(grid).__name__ == "GridResult" and isinstance(grid, dict) and list(grid) == ["fe_lt", "lt<x>"]
    markup = grid._repr_html_()
    assert_escaped(markup)
    assert caption(markup).startswith("GridResult: 2 specs × 2 prompts")
    found = cells(markup)
    assert found[0] == "spec" and found[1] == PROMPTS[0][:29] + "…"
    lt_row = found[found.index("lt<x>"):][:3]
    probs = grid["lt<x>"].probs
    for j in range(2):
        best = int(probs[j].argmax())
        assert lt_row[1 + j] == f"{grafter.tokenizer.decode([best])!r} {float(probs[j, best]):.3f}"
    targets = grid.target_probs("Alan")
    assert targets["fe_lt"] == pytest.approx(grid["fe_lt"].target_prob("Alan").tolist())


def test_generation_result_html_and_repr_show_the_texts_not_the_logits(grafter):
    out = grafter.generate(FE_LT, PROMPTS, SPANS, max_new_tokens=3)
    markup = out._repr_html_()
    assert_escaped(markup)
    assert caption(markup) == "GenerationResult: 2 rows × 3 new tokens"
    found = cells(markup)
    assert found[3:6] == ["0", out.texts[0], " ".join(str(int(t)) for t in out.tokens[0])]
    assert len(repr(out)) < 300 and "tensor" not in repr(out)


def test_spec_html_lists_its_rules():
    markup = LT._repr_html_()
    assert_escaped(markup)
    assert caption(markup) == "GraftSpec 'lt<x>'"
    assert cells(markup)[5:] == ["mlp", "last:1", '{"last": true}', "F", "all of ΔW"]
    assert caption(GraftSpec(name="p")._repr_html_()) == "GraftSpec 'p' (no rules: plain P)"


def test_attribution_html_ranks_the_top_units(grafter):
    from nngraft.attribution import target_logprob

    att = grafter.attribute(target_logprob([5, 7]), PROMPTS, SPANS)
    markup = att._repr_html_()
    assert_escaped(markup)
    top = att.table()
    assert caption(markup).startswith(f"Attribution of logprob (logprob on P = {att.metric_p:.4g}): "
                                      f"{len(att.units)} units, 2 prompts")
    found = cells(markup)
    assert found[:2] == ["unit", "score"]
    assert found[2:4] == [top[0]["unit"], f"{top[0]['score']:.4g}"]
    assert len(found) == 2 + 2 * 15
    assert repr(att).startswith(f"Attribution(logprob, {len(att.units)} units, 2 prompts") and len(repr(att)) < 200


def test_localize_result_html_states_recovery_rules_and_comparison():
    from rich.console import Console

    from nngraft.study.data import make_facts
    from nngraft.study.templates import make_test_examples
    from nngraft.study.localize import compare_with_fe_lt, localize
    from nngraft.testing import perturbed_copy, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("llama")
    P = tiny_model("llama", n_layers=2, vocab_size=len(tok))
    F = perturbed_copy(P, scale=0.3, only=("model.layers.1.mlp.up_proj",))
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 3, seed=0), "sentence_1")
    g = Grafter(P, F, tok)
    result = localize(g, examples, targets="donor_top1", metric="logprob", console=Console(quiet=True),
                      show_progress=False)
    result.comparison = compare_with_fe_lt(g, examples, result)
    markup = result._repr_html_()
    assert_escaped(markup)
    assert caption(markup).startswith(f"found {len(result.units)} of {result.universe_units} units, recovery "
                                      f"{result.recovery.mean:.3f}")
    found = cells(markup)
    assert found[0] == "found rules" and any("up" in c for c in found[1:])
    names = [c["name"] for c in result.comparison]
    assert names[:2] == ["P", "F"] and all(name in found for name in names)
    assert repr(result).startswith(f"LocalizeResult({len(result.units)} of {result.universe_units} units")


def test_finetune_result_html_has_a_row_per_epoch():
    from nngraft.study.finetune import CPU_FAST, finetune
    from nngraft.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("llama")
    model = tiny_model("llama", vocab_size=len(tok))
    result = finetune(model, tok, ["Zolvatrin is made by <Harlow> Labs."] * 4, config=CPU_FAST.replace(epochs=2),
                      progress=False)
    markup = result._repr_html_()
    assert_escaped(markup)
    assert caption(markup).startswith(f"FinetuneResult: 2 epochs (full), epoch {result.best_epoch} selected")
    found = cells(markup)
    assert found[7:9] == ["1", f"{result.history[0].train_loss:.4g}"]
    assert found[14:16] == ["2", f"{result.history[1].train_loss:.4g}"]
    assert "selected" in found
    assert repr(result).startswith("FinetuneResult(2 epochs, best epoch ") and "Linear" not in repr(result)


def test_result_rows_and_sweep_outcome_html_summarize_per_spec(tmp_path):
    from nngraft.study.evaluate import EvalStats
    from nngraft.study.results import ResultRows
    from nngraft.study.sweep import SweepOutcome

    rows = ResultRows([{"model": "m", "spec": "p", "prob": 0.1, "top_1": False, "recovery": 0.0},
                       {"model": "m", "spec": "<fe>", "prob": 0.5, "top_1": True, "recovery": 0.5},
                       {"model": "m", "spec": "<fe>", "prob": 0.7, "top_1": False, "recovery": 0.75}])
    markup = rows._repr_html_()
    assert_escaped(markup)
    assert cells(markup)[6:] == ["m", "p", "1", "0.1", "0", "0", "m", "<fe>", "2", "0.6", "0.5", "0.625"]
    outcome = SweepOutcome(Path(tmp_path), Path(tmp_path) / "results.jsonl", Path(tmp_path) / "manifest.json",
                           {"tiny<1>": EvalStats(written=6, skipped=2, seconds=1.5, rows=[{}] * 6)},
                           {"tiny<1>": {"ok": True}})
    markup = outcome._repr_html_()
    assert_escaped(markup)
    assert cells(markup)[5:] == ["tiny<1>", "6", "2", "1.5", "ok"]
    assert repr(outcome) == f"SweepOutcome(results={str(tmp_path / 'results.jsonl')!r}, rows written={{'tiny<1>': 6}})"


def test_html_of_a_result_without_tokenizer_shows_token_ids():
    from nngraft.result import GraftResult

    logits = torch.zeros(1, 10)
    logits[0, 7] = 5.0
    found = cells(GraftResult(logits, ["x"])._repr_html_())
    assert found[7].startswith("'7' ")
