"""The metric registry (nngraft.study.metric_registry): a metric registered in one place is stored
by `nngraft run` and sweeps, shown in the table and `--json`, plotted, and usable by localize; a
user's own callable (module:function) works without registering; the built-ins equal direct
computation; bad metrics fail with one clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nngraft import Grafter
from nngraft.cli import main
from nngraft.result import target_token_id
from nngraft.study.metric_registry import (REGISTRY, Metric, MetricError, MetricInputs, get_metric, register,
                                           resolve, unregister)
from nngraft.study.results import load_results
from nngraft.study.sweep import save_examples_jsonl
from nngraft.testing import tiny_pair
from tests.helpers import ROOT
from tests.helpers.examples import TWO_FACTS

SPECS = ROOT / "recipes" / "specs"
EXAMPLES = list(TWO_FACTS)


def margin(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """target logit minus the mean logit"""
    return logits.gather(1, inputs.target_ids[:, None])[:, 0] - logits.mean(-1)


def next_token_entropy(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """A user's own metric, never registered: given to the CLI as module:function."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.fixture()
def registered():
    """The one place a new metric is defined."""
    register("target_margin", label="margin", description="target logit minus the mean logit",
             summary="mean target margin")(margin)
    yield REGISTRY["target_margin"]
    unregister("target_margin")


@pytest.fixture()
def examples(tmp_path: Path) -> Path:
    return save_examples_jsonl(EXAMPLES, tmp_path / "examples.jsonl")


def direct(model, tok, metric) -> dict[str, float]:
    """``metric`` of a plain forward of ``model`` on each example's prompt, by fact."""
    out = {}
    for ex in EXAMPLES:
        ids = torch.tensor([tok(ex.prompt)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()
        target = torch.tensor([target_token_id(tok, ex.prompt, ex.answer)])
        out[ex.fact_id] = float(metric(logits, MetricInputs(target))[0])
    return out


def test_a_registered_metric_reaches_run_rows_table_json_and_plot(registered, examples, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--tiny", "llama", "--spec", str(SPECS / "lt.json"), "--data", str(examples), "--no-progress",
            "--metric", "target_margin"]
    assert main(args + ["-o", "out"]) == 0
    table = capsys.readouterr().out
    assert "margin" in table and "logit diff" in table  # its column, beside the built-ins'
    rows = load_results(tmp_path / "out")
    P, F, tok = tiny_pair("llama")
    for spec, model in (("p", P), ("f", F)):
        expected = direct(model, tok, margin)
        got = {r["fact_id"]: r["target_margin"] for r in rows if r["spec"] == spec}
        assert got == pytest.approx(expected, abs=1e-4)
    assert all(isinstance(r["target_margin"], float) for r in rows)
    # --json: the mean over facts
    assert main(args + ["--json"]) == 0
    summary = {s["spec"]: s for s in json.loads(capsys.readouterr().out)["summary"]}
    lt = [r["target_margin"] for r in rows if r["spec"] == "lt"]
    assert summary["lt"]["target_margin"]["mean"] == pytest.approx(sum(lt) / len(lt), rel=1e-9)
    # plot --metric: a panel named after it
    from nngraft.study import plot

    panels: list[list[str]] = []
    monkeypatch.setattr(plot, "_save", lambda fig, stem, formats: panels.append(
        [ax.get_ylabel() for ax in fig.get_axes()]) or [stem.with_suffix(".png")])
    assert main(["plot", "out", "--metric", "target_margin", "--specs", "p,f,lt", "-o", "plots"]) == 0
    assert panels and all("mean target margin" in p for p in panels)
    # resuming with other metrics is refused (rows must agree)
    assert main(["run", "--tiny", "llama", "--spec", str(SPECS / "lt.json"), "--data", str(examples),
                 "--no-progress", "-o", "out", "--metric", "rank"]) == 2
    assert "was written with the metrics" in capsys.readouterr().err


def test_a_users_callable_as_module_function_without_registering(examples, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["run", "--tiny", "gpt2", "--spec", str(SPECS / "fe.json"), "--data", str(examples),
                     "--no-progress", "-o", "out", "--metric", f"{__name__}:next_token_entropy"]) == 0
        rows = load_results(tmp_path / "out")
        P, _, tok = tiny_pair("gpt2")
        got = {r["fact_id"]: r["next_token_entropy"] for r in rows if r["spec"] == "p"}
        assert got == pytest.approx(direct(P, tok, next_token_entropy), abs=1e-4)
        assert "next_token_entropy" in capsys.readouterr().out
    finally:
        unregister("next_token_entropy")


def test_sweep_evaluate_stores_the_metrics_asked_for(registered):
    from nngraft.study.grids import paper_specs
    from nngraft.study.sweep import evaluate

    P, F, tok = tiny_pair("qwen3")
    specs = [paper_specs()[n] for n in ("p", "f", "fe_lt")]
    stats = evaluate(Grafter(P, F, tok), specs, EXAMPLES, metrics=["prob", registered], ks=(3,))
    for row in stats.rows:
        assert {"prob", "target_margin", "top_3"} <= set(row) and "kl_f_graft" not in row
    p_rows = {r["fact_id"]: r for r in stats.rows if r["spec"] == "p"}
    assert {f: r["target_margin"] for f, r in p_rows.items()} == pytest.approx(direct(P, tok, margin), abs=1e-4)
    assert {f: r["prob"] for f, r in p_rows.items()} == pytest.approx(direct(P, tok, get_metric("prob")), abs=1e-6)


def test_builtins_against_direct_computation():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    p_logits = torch.tensor([[0.0, 0.0, 5.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    f_logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    inputs = MetricInputs(torch.tensor([1, 1]), p_logits, f_logits)
    z0 = math.exp(2) + 2 * math.e + 1
    values = {name: get_metric(name)(logits, inputs).tolist() for name in REGISTRY if REGISTRY[name].fn}
    assert values["prob"] == pytest.approx([math.e / z0, math.exp(3) / (math.exp(3) + 3)], rel=1e-6)
    assert values["logprob"] == pytest.approx([1 - math.log(z0), 3 - math.log(math.exp(3) + 3)], rel=1e-6)
    assert values["rank"] == [1, 0]  # a tie (token 2 = 1.0) does not push the target down
    assert values["top_1"] == [False, True] and values["top_5"] == [True, True]
    # foil = P's most likely other token: 2 in row 0, 0 in row 1
    assert values["logit_diff"] == pytest.approx([1.0 - 1.0, 3.0 - 0.0])
    kl = lambda a, b: float((torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1))).sum())  # noqa: E731
    assert values["kl_f_graft"] == pytest.approx([kl(f_logits[i], logits[i]) for i in range(2)], rel=1e-5)
    assert values["kl_graft_p"] == pytest.approx([kl(logits[i], p_logits[i]) for i in range(2)], rel=1e-5)
    assert get_metric("top1") is get_metric("top_1") and get_metric("top_7").name == "top_7"


def test_scalar_form_for_gradient_methods():
    """Metric.scalar binds the targets: logits -> the mean over prompts, differentiable (the form
    Grafter.attribute and TransformerLens's patching functions take)."""
    logits = torch.randn(3, 11, requires_grad=True)
    fn = get_metric("logprob").scalar([4, 0, 7])
    value = fn(logits)
    value.backward()
    expected = torch.log_softmax(logits.detach(), -1)[[0, 1, 2], [4, 0, 7]].mean()
    assert fn.name == "logprob" and float(value.detach()) == pytest.approx(float(expected))
    grad = torch.softmax(logits.detach(), -1) / -3
    grad[[0, 1, 2], [4, 0, 7]] += 1 / 3
    torch.testing.assert_close(logits.grad, grad)


def test_localize_searches_any_registered_metric_without_baselines(registered):
    from nngraft.study.localize_search import per_fact_metric
    from nngraft.study.localize_units import LocalizeError, metric_label

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 4.0]])
    got = per_fact_metric(logits, [0, 0, 2], ["b", "a", "b"], "target_margin")
    assert got.tolist() == pytest.approx([0.0 - 1 / 3, ((2.0 - 1.0) + (4.0 - 2.0)) / 2])  # facts a, b
    assert per_fact_metric(logits, [0, 0, 2], ["b", "a", "b"], "top1").tolist() == [0.0, 1.0]
    assert metric_label("target_margin") == "mean target margin" and metric_label("prob") == "mean target probability"
    with pytest.raises(LocalizeError, match="cannot steer a search"):
        per_fact_metric(logits, [0, 0, 2], ["b", "a", "b"], "kl_f_graft")
    with pytest.raises(LocalizeError, match="unknown metric 'nope'; known: prob, logprob"):
        per_fact_metric(logits, [0, 0, 2], ["b", "a", "b"], "nope")


def test_bad_metrics_fail_with_one_clear_error(registered, examples, tmp_path, capsys, monkeypatch):
    with pytest.raises(MetricError, match="already registered"):
        register(Metric("target_margin", lambda logits, inputs: logits[:, 0]))
    with pytest.raises(MetricError, match=r"returned shape \(2, 3\); a metric returns one value per prompt"):
        Metric("whole", lambda logits, inputs: logits)(torch.zeros(2, 3), MetricInputs(torch.tensor([0, 1])))
    with pytest.raises(MetricError, match="needs P's and F's logits"):
        get_metric("kl_graft_p")(torch.zeros(1, 3), MetricInputs(torch.tensor([0])))
    with pytest.raises(MetricError, match="cannot import 'nope' from 'math'"):
        get_metric("math:nope")
    assert [m.name for m in resolve(["prob", "top1", "prob"])] == ["prob", "top_1"]
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--tiny", "llama", "--spec", "lt", "--data", str(examples), "--no-progress",
                 "--metric", "probability"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'probability'; known: prob, logprob, rank" in err and "Traceback" not in err


def test_docs_metric_example_runs_as_written(examples, tmp_path, capsys, monkeypatch):
    """docs/study.md's metric section: its Python block registers a metric; its commands run with
    the user's module on the path (the same function as mypkg/metrics.py)."""
    import re
    import shlex

    text = (ROOT / "docs" / "study.md").read_text()
    section = text[text.index("### Metrics are one registry"):text.index("## The specs")]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    [commands] = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    try:
        scope: dict = {}
        exec(compile(code, "docs/study.md (metric example)", "exec"), scope)
        logits = torch.tensor([[1.0, 3.0, 2.0]])
        assert float(REGISTRY["target_margin"](logits, MetricInputs(torch.tensor([1])))[0]) == pytest.approx(1.0)
        unregister("target_margin")
        (tmp_path / "mypkg").mkdir()
        (tmp_path / "mypkg" / "__init__.py").write_text("")
        (tmp_path / "mypkg" / "metrics.py").write_text(code)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.chdir(tmp_path)
        lines = [line.split("#")[0].strip() for line in commands.strip().splitlines()]
        for line in lines:
            argv = shlex.split(line)
            assert argv[0] == "nngraft"
            assert main(argv[1:] + (["--no-progress"] if argv[1] == "run" else [])) == 0, line
        assert "margin" in capsys.readouterr().out
        rows = load_results(tmp_path / "runs" / "m")
        assert all(isinstance(r["target_margin"], float) for r in rows)
        assert list((tmp_path / "runs" / "m" / "plots").glob("bars_*.png"))
    finally:
        unregister("target_margin")


def test_a_sweep_config_never_imports_the_module_a_metric_names(tmp_path, monkeypatch):
    """A sweep config is data that may come from another lab: ``module:function`` there is refused
    before anything is imported (an armed module on sys.path would create a file if imported)."""
    from pydantic import ValidationError

    from nngraft.study.sweep_config import SweepConfig

    armed = tmp_path / "armed_metric_module.py"
    fired = tmp_path / "fired"
    armed.write_text(f"open({str(fired)!r}, 'w').close()\ndef metric(logits, inputs):\n    return logits[:, 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValidationError, match="registered metrics only, not module:function"):
        SweepConfig.model_validate({"models": [{"name": "tiny", "tiny": "llama"}],
                                    "metrics": ["armed_metric_module:metric"]})
    assert not fired.exists()
