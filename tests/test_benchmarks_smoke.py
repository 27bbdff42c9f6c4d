"""The benchmark scripts run (``--smoke``: tiny model, one repetition), print their table with the
expected rows, write the same record as JSON, and every output they compare agrees to float noise.

No timing thresholds here: timings are only checked to be real, positive measurements. The paper
method the benchmarks time is also checked against the test suite's own oracle
(tests/helpers/reference.py), and the docs writer against clobbering other people's sections."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from benchmarks.baselines import graft_paths, paper_method, per_token_inplace
from benchmarks.report import BEGIN, END, HEADING, render, update_docs
from nngraft.arch import adapter_for
from nngraft.testing import tiny_pair, tiny_tokenizer

from tests.helpers.reference import component_swaps, per_token_reference

NOISE = 1e-4  # tiny model, float32: equal computations differ by ~1e-6

EXPECTED_ROWS = {
    "bench_vs_paper": ("comparison", ["1 prompt × 20 tokens", "4 prompts × 20 tokens, per example"] * 2),
    "bench_overhead": ("variant", ["plain", "plain, nnsight-wrapped P", "empty trace",
                                   "MLPs of the last 4 layers @ last token", "all MLPs @ all positions",
                                   "q, k, v, o (all layers) @ entity tokens"]),
    "bench_grid": ("workload", ["K=4 specs × N=1 prompt × 20 tokens"]),
    "bench_memory": ("variant", ["P only", "lazy donor", "F from_pretrained", "F materialized"]),
    "bench_scaling": ("tokens", [8, 16]),
}


def _numbers(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """Run every benchmark once in --smoke mode; keep what each printed and returned."""
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("bench")
    out = {}
    try:
        for name in EXPECTED_ROWS:
            module = importlib.import_module(f"benchmarks.{name}")
            # one thread: no OpenMP hand-offs, which are slow on a loaded CI box (timings unchecked)
            argv = ["--smoke", "--threads", "1", "--out", str(folder / f"{name}.json")]
            if name == "bench_scaling":
                argv += ["--plot", str(folder / "scaling.png")]
            out[name] = module.main(argv)
    finally:
        torch.set_num_threads(threads)
    return folder, out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_benchmark_smoke_table_rows_and_exactness(name, smoke_results, capsys):
    folder, results = smoke_results
    record = results[name]
    key, expected = EXPECTED_ROWS[name]
    assert [row[key] for row in record["rows"]] == expected
    assert record["columns"][0] == key
    # every row has a value for every column the table prints
    assert all(set(record["columns"]) <= set(row) for row in record["rows"])
    # the JSON written is the record returned
    assert json.loads((folder / f"{name}.json").read_text())["rows"] == json.loads(json.dumps(record["rows"],
                                                                                            default=str))
    # outputs compared inside the benchmark agree to float noise, and there are such comparisons
    assert record["checks"], f"{name} compares no outputs"
    for label, diff in record["checks"].items():
        assert 0 <= diff <= NOISE, f"{name}: {label} differs by {diff}"
    # timings are real measurements (positive, finite); no thresholds on their values
    seconds = list(_numbers(record["raw"].get("seconds", {})))
    if name != "bench_memory":
        assert seconds and all(math.isfinite(s) and s > 0 for s in seconds)
    assert record["machine"]["nproc"] >= 1 and record["command"].startswith(f"python -m benchmarks.{name}")


@pytest.mark.slow
def test_benchmark_specific_numbers(smoke_results):
    _, r = smoke_results
    # 1: the grafts change the output, so agreeing to float noise is not vacuous
    assert r["bench_vs_paper"]["config"]["graft_effect_max_abs_logit_change"] > 0.05
    assert all(v > 0.05 for v in r["bench_overhead"]["config"]["graft_effect_max_abs_logit_change"].values())
    # 2: FLOP fractions: a last-token graft is a small fraction, all MLPs everywhere a large one
    frac = {row["variant"]: row["FLOP fraction"] for row in r["bench_overhead"]["rows"]}
    assert 0 < frac["MLPs of the last 4 layers @ last token"] < 0.1
    assert 0.3 < frac["all MLPs @ all positions"] < 1
    # matmul FLOPs computed by hand for the tiny Llama (hidden 32, MLP 64, 8 layers, 4 heads of 8
    # features, 2 key/value heads, vocabulary V); a matmul of (m×k)·(k×n) is 2·m·k·n FLOPs:
    # per layer, on B·T token rows, q and o (32×32), k and v (32×16), gate, up and down (32×64),
    # plus eager attention's scores and mixing (2 × B·heads·T·T·8); then the LM head (32×V) on
    # the last position only (logits_to_keep=1).
    cfg = r["bench_overhead"]["config"]
    B, T, H, I, heads, hd, kv, n_layers = cfg["batch"], cfg["length"], 32, 64, 4, 8, 16, 8
    V = len(tiny_tokenizer("llama"))
    mlp = 2 * B * T * 3 * H * I
    per_layer = 2 * B * T * (H * H + 2 * H * kv + H * H) + mlp + 2 * (2 * B * heads * T * T * hd)
    by_hand = n_layers * per_layer + 2 * B * H * V
    assert (B, T) == (4, 20) and by_hand == 13_520_896  # the numbers the smoke run uses
    assert cfg["plain_matmul_flops"] == by_hand
    # the FLOP fractions follow: every MLP at every cell, and 4 MLPs at 1 of T cells per prompt
    assert frac["all MLPs @ all positions"] == pytest.approx(n_layers * mlp / by_hand, rel=1e-12)
    assert frac["MLPs of the last 4 layers @ last token"] == pytest.approx(4 * mlp / T / by_hand, rel=1e-12)
    # a graft replaces P's computation at its cells: every grafted forward does a plain one's matmuls
    assert set(cfg["grafted_matmul_flops"]) == {"MLPs of the last 4 layers @ last token", "all MLPs @ all positions",
                                                "q, k, v, o (all layers) @ entity tokens"}
    assert all(f == cfg["plain_matmul_flops"] for f in cfg["grafted_matmul_flops"].values())
    # 4: the lazy donor and a fully loaded F give identical logits
    assert r["bench_memory"]["checks"]["lazy donor vs F materialized"] == 0
    assert r["bench_memory"]["checks"]["lazy donor vs F from_pretrained"] == 0
    # 5: the plot was written, and the paper method was measured (not estimated) at both lengths
    assert all(row["paper: how"] == "measured" for row in r["bench_scaling"]["rows"])
    assert r["bench_scaling"]["config"]["plot"].endswith("scaling.png")


@pytest.mark.slow
def test_report_renders_every_benchmark(smoke_results, tmp_path):
    _, results = smoke_results
    text = render({"tiny": results}, docs_dir=tmp_path)
    for record in results.values():
        assert record["title"] in text
        assert record["command"] in text
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "GPU" in text and "Not measured" in text


def test_update_docs_keeps_other_sections_and_hand_written_text(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Demo\n\ndemo text\n\n" + HEADING + "\n\nintro\n\n" + BEGIN + "\nold\n"
                    + END + "\n\n### Known overheads\n\nhand-written\n\n## Remote\n\nremote text\n")
    update_docs(path, BEGIN + "\nnew table\n" + END)
    text = path.read_text()
    assert "old" not in text and "new table" in text
    for kept in ("## Demo\n\ndemo text", "intro", "### Known overheads\n\nhand-written", "## Remote\n\nremote text"):
        assert kept in text
    # a file without the section gets it appended; other text untouched
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\n## Demo\n\ndemo text\n")
    update_docs(other, BEGIN + "\nx\n" + END)
    assert other.read_text() == "# Benchmarks\n\n## Demo\n\ndemo text\n\n" + HEADING + "\n\n" + BEGIN + "\nx\n" + END + "\n"


@pytest.mark.parametrize("components,where", [(["mlp"], "last"), (["q", "k", "v", "o"], "span")])
def test_benchmark_baselines_equal_the_test_suite_reference(components, where):
    """The timed paper method (deepcopy + load_state_dict per token) and the in-place variant give
    the logits of tests/helpers/reference.py at every position, for an MLP and an attention graft."""
    P, F, tok = tiny_pair("llama", n_layers=3)
    adapter = adapter_for(P)
    ids = tok("Ada Lovelace stars in a movie alongside")["input_ids"]
    at = [len(ids) - 1] if where == "last" else [1, 2, 3]
    layers = [1, 2]
    paths = graft_paths(adapter, P.config, components, layers)
    swaps = [s for c in adapter.expand(components)[0] for layer in layers
             for s in component_swaps(P, adapter, c, layer)]
    expected, _ = per_token_reference(P, F, ids, lambda t: swaps if t in at else [])
    patches = {t: paths for t in at}
    plain = per_token_inplace(P, F, ids, {})
    for got in (paper_method(P, F, ids, patches), per_token_inplace(P, F, ids, patches)):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (expected - plain).abs().max() > 1e-2  # the graft matters
    # P is left exactly as it was
    P2, _, _ = tiny_pair("llama", n_layers=3)
    assert all(torch.equal(a, b) for a, b in zip(P.state_dict().values(), P2.state_dict().values()))


def test_graft_paths_refuses_what_the_baselines_cannot_graft():
    P, _, _ = tiny_pair("gpt2")
    with pytest.raises(ValueError, match="fused projection"):
        graft_paths(adapter_for(P), P.config, ["q"], [0])
    P, _, _ = tiny_pair("llama")
    with pytest.raises(ValueError, match="block components only"):
        graft_paths(adapter_for(P), P.config, ["embed"], [0])


def test_run_path_counts_the_files_a_command_enters():
    """benchmarks/run_path.py's probe on ``nngraft schema``: the files whose functions run are the CLI,
    the schema verb, the spec schema and the spec models' schema hook (called by pydantic, so no
    climb back into nngraft), no other verb's module and nothing of the study (imports and the
    import system's calls skipped); each climb back is a return to a caller in another file."""
    from benchmarks.run_path import measure
    from tests.helpers import ROOT

    result = measure(ROOT, ["schema"])
    assert sorted(result["entered"]) == ["nngraft/cli/__init__.py", "nngraft/cli/core.py", "nngraft/spec/positions.py",
                                         "nngraft/spec/schema.py"]
    assert "spec_json_schema" in result["entered"]["nngraft/spec/schema.py"]
    assert set(result["entered"]["nngraft/spec/positions.py"]) == {"Documented.__get_pydantic_json_schema__"}
    assert set(result["climbs"]) == {"nngraft/cli/core.py -> nngraft/cli/__init__.py",
                                     "nngraft/spec/schema.py -> nngraft/cli/core.py"}
    assert result["returns"] == sum(result["climbs"].values())


def test_run_path_floor_is_the_fewest_500_line_files_that_hold_the_code(tmp_path):
    """The run-path table's floor: the entered files' lines, divided by the 500-line ceiling and
    rounded up (1000 lines need 2 files, 1001 need 3)."""
    from benchmarks.run_path import floor_of_files

    (tmp_path / "a.py").write_text("x = 1\n" * 600)
    (tmp_path / "b.py").write_text("y = 2\n" * 400)
    assert floor_of_files(tmp_path, {"a.py": {}, "b.py": {}}) == (1000, 2)
    (tmp_path / "b.py").write_text("y = 2\n" * 401)
    assert floor_of_files(tmp_path, {"a.py": {}, "b.py": {}}) == (1001, 3)


def test_the_planted_mutants_still_apply_to_the_validators():
    """benchmarks/mutate_validators.py: each mutant's text occurs once in its file (a validator
    rewritten without its mutants would silently leave them out)."""
    import subprocess
    import sys

    from benchmarks.mutate_validators import MUTANTS, check_applicable

    assert check_applicable() == [] and len(MUTANTS) >= 25
    assert {m.path for m in MUTANTS} == {"nngraft/util/checks.py", "nngraft/spec/schema.py", "nngraft/cli/boundary.py"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.mutate_validators", "--list"], capture_output=True,
                          text=True, cwd=str(__import__("tests.helpers", fromlist=["ROOT"]).ROOT))
    assert done.returncode == 0 and len(done.stdout.splitlines()) == len(MUTANTS)
