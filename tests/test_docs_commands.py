"""Every command shown in README.md and docs/*.md is run by a test, with tiny models.

The shell commands of every ``bash`` block (continuation lines joined, ``&&`` chains split,
comments dropped) and every ``python`` block are extracted; each one must be in :data:`WHERE`:
run here (the ``run`` verdict: in a temporary folder holding tiny stand-ins under the names the
docs use), run by another test that reads the same doc (``elsewhere``: the test must exist and
read that doc), or exempt with a reason (``exempt``: NDIF, the Hugging Face Hub, a GPU, PyPI, or
hours of CPU; an exempt ``nngraft`` command is still parsed by nngraft's own argument parser and
an exempt Python block compiled). A command added to the docs that is in none of these fails
:func:`test_every_docs_command_is_run_or_exempted`, and so does an entry for a command that is no
longer in the docs.

Stand-ins: a folder at the path a command names (``meta-llama/Llama-3.2-1B``, ``runs/sft/llama``,
``path/to/F``) holds a tiny random Llama (P) or its perturbed copy (F); names that are not paths
(``smollm2``, the cache folders of docs/localize.md) are replaced by such folders (:data:`RENAMED`).
A Python block gets tiny stand-ins for the names it uses without defining them (the surrounding
text's ``P``, ``F``, ``tokenizer``, ``spec`` …: :func:`_python_scope`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP = ("pip install", "python3 -m venv", ". .venv/bin/activate", "python -m pytest")
"""Environment set-up (PyPI) and the test suite itself: exempt as a class (README's first block)."""
FILE_WRITERS = ("cat", "printf")
"""Shell lines that only write the files the next commands read: run with bash, as written."""


@dataclass(frozen=True)
class Command:
    doc: str            # "docs/data.md"
    kind: str           # "shell" or "python"
    key: str            # the command, normalized (shell), or the block's first statement (python)
    text: str           # what runs: the shell line as written (heredoc included), or the block


def _shell_commands(doc: str, block: str) -> list[Command]:
    lines = block.replace("\\\n", " ").splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:  # the body up to the end marker belongs to this command
            end = lines.index(heredoc[1], i)
            text, i = "\n".join([line, *lines[i:end + 1]]), end + 1
            out.append(Command(doc, "shell", " ".join(shlex.split(line, comments=True)), text))
            continue
        words = shlex.split(line, comments=True)
        if words and "&&" not in words:  # as written (redirections included)
            out.append(Command(doc, "shell", " ".join(words), line))
            continue
        while words:  # `a && b`: two commands
            cut = words.index("&&") if "&&" in words else len(words)
            part, words = words[:cut], words[cut + 1:]
            out.append(Command(doc, "shell", " ".join(part), shlex.join(part)))
    return out


def _first_statement(block: str) -> str:
    for line in block.splitlines():
        if line.strip() and not line.startswith(("from ", "import ", "#")):
            return line.split("  #")[0].strip()
    return block.splitlines()[0]


def doc_commands() -> list[Command]:
    """Every command of README.md and docs/*.md, in the order the docs show them."""
    found = []
    for path in DOCS:
        doc = str(path.relative_to(ROOT))
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), flags=re.S):
            if lang in ("bash", "sh", "shell", "console"):
                found += _shell_commands(doc, block)
            elif lang == "python":
                found.append(Command(doc, "python", _first_statement(block), block))
    return found


RUN, ELSEWHERE, EXEMPT = "run", "elsewhere", "exempt"
NDIF = "needs NDIF (a hub model served remotely) and an API key"
WHERE: dict[tuple[str, str], tuple[str, str]] = {
    # README.md
    ("README.md", "nngraft demo"): (EXEMPT, "the full demo finetunes SmolLM2-135M for an hour on a CPU; "
                                            "tests/study/test_demo.py runs its --quick form on the real model"),
    ("README.md", "P, F, tokenizer = tiny_pair(\"llama\")"):
        (ELSEWHERE, "tests/test_docs.py::test_readme_python_runs_as_written"),
    ("README.md", "df = load_results(\"runs/try\").to_dataframe()"):
        (ELSEWHERE, "tests/test_docs.py::test_readme_python_runs_as_written"),
    # docs/architectures.md
    ("docs/architectures.md", "register_adapter(Adapter("): (RUN, ""),
    # docs/attribution.md: its own test runs the block and the commands as written
    ("docs/attribution.md", "g = Grafter(*tiny_pair(\"llama\"))"):
        (ELSEWHERE, "tests/attribution/test_gradient.py::test_docs_attribution_runs_as_written"),
    ("docs/attribution.md", "nngraft attribute --tiny llama --dataset fake_movies_fake_actors --n 4 --template "
                            "sentence_1 --targets donor_top1 --steps 4 --exact -o runs/att-tiny"):
        (ELSEWHERE, "tests/attribution/test_gradient.py::test_docs_attribution_runs_as_written"),
    ("docs/attribution.md", "nngraft plot runs/att-tiny/attribution.json"):
        (ELSEWHERE, "tests/attribution/test_gradient.py::test_docs_attribution_runs_as_written"),
    ("docs/attribution.md", "nngraft localize --tiny llama --dataset fake_movies_fake_actors --n 4 --template "
                            "sentence_1 --targets donor_top1 --metric logprob --screen attribution -o runs/loc-att"):
        (ELSEWHERE, "tests/attribution/test_gradient.py::test_docs_attribution_runs_as_written"),
    # docs/bundle.md: its own test runs every command of its bash blocks
    **{("docs/bundle.md", key): (ELSEWHERE, "tests/study/test_bundle.py::test_the_commands_of_docs_bundle_md_run_as_written")
       for key in ("nngraft run --tiny llama --spec fe_lt --dataset fake_movies_fake_actors --n 3 --template sentence_1 "
                   "-o runs/try", "nngraft bundle runs/try -o try.zip", "nngraft reproduce try.zip",
                   "nngraft run --model P --donor F --spec fe_lt --spec lt --data examples.jsonl -o runs/mine",
                   "nngraft bundle runs/mine -o mine.zip", "nngraft reproduce mine.zip -o check --json",
                   "nngraft bundle runs/mine -o mine-ref.tar.gz --pack-donor never",
                   "nngraft reproduce mine-ref.tar.gz --donor F")},
    ("docs/bundle.md", "python recipes/two_installs.py --current-python"):
        (ELSEWHERE, "tests/study/test_bundle.py::test_the_two_installs_recipe_reproduces_in_one_interpreter"),
    # docs/data.md
    ("docs/data.md", "facts = make_facts(\"fake_movies_fake_actors\", 200, seed=0)"): (RUN, ""),
    ("docs/data.md", "nngraft data make fake_movies_fake_actors -n 200 --seed 0 -o data/fmfa.jsonl"): (RUN, ""),
    ("docs/data.md", "nngraft data show data/fmfa.jsonl --tokenizer smollm2"): (RUN, ""),
    ("docs/data.md", "nngraft data texts data/fmfa.jsonl -o data/fmfa.texts.jsonl"): (RUN, ""),
    ("docs/data.md", "nngraft data templates"): (RUN, ""),
    ("docs/data.md", "facts = load_facts(\"mine.jsonl\")"): (RUN, ""),
    # docs/demo.md
    ("docs/demo.md", "nngraft demo"): (EXEMPT, "the full demo: an hour of CPU (see README.md's entry)"),
    ("docs/demo.md", "nngraft demo --quick"):
        (ELSEWHERE, "tests/study/test_demo.py::test_quick_demo_writes_a_row_for_every_spec_and_fact"),
    ("docs/demo.md", "nngraft finetune --model meta-llama/Llama-3.2-1B --dataset fake_movies_fake_actors --n 1000 "
                     "--out runs/sft/llama-fmfa"):
        (EXEMPT, "the paper's recipe: 1000 facts × 22 texts × 10 epochs (a GPU); its --n 24 form runs here"),
    ("docs/demo.md", "nngraft finetune --model smollm2 --dataset fake_movies_fake_actors --n 24 --families qa "
                     "--preset cpu-fast --epochs 3 --out runs/sft/smollm2-fmfa"): (RUN, ""),
    ("docs/demo.md", "python recipes/finetune.py --tiny"): (RUN, ""),
    ("docs/demo.md", "result = finetune(model, tokenizer, texts, config=PAPER, out_dir=\"runs/sft/mine\")"): (RUN, ""),
    # docs/gpu.md
    ("docs/gpu.md", "P = AutoModelForCausalLM.from_pretrained(\"meta-llama/Meta-Llama-3-8B\", "
                    "device_map=\"auto\", dtype=\"bfloat16\")"):
        (EXEMPT, "an 8B hub model on a GPU; tests/test_gpu_check.py runs the same steps on the CPU"),
    ("docs/gpu.md", "benchmarks/fetch_gpu_wheels.sh"): (EXEMPT, "downloads wheels from PyPI"),
    ("docs/gpu.md", "OUT=DIR benchmarks/gpu_check.sh"): (EXEMPT, "needs a GPU; its --dry-run runs on the CPU"),
    ("docs/gpu.md", "benchmarks/gpu_check.sh --dry-run"):
        (ELSEWHERE, "tests/test_gpu_check.py::test_dry_run_passes_and_writes_every_step_to_out"),
    ("docs/gpu.md", "python -m benchmarks.gpu_check --publish DIR/gpu_check.jsonl"):
        (ELSEWHERE, "tests/test_gpu_check.py::test_dry_run_passes_and_writes_every_step_to_out"),
    # docs/localize.md
    ("docs/localize.md", "nngraft localize --model meta-llama/Llama-3.2-1B --donor runs/sft/llama --facts "
                         "runs/sft/llama/facts.jsonl --template sentence_3 --target 0.9 --holdout 0.2 "
                         "-o runs/localize-llama"): (RUN, ""),
    ("docs/localize.md", "examples = make_test_examples(load_facts(\"runs/sft/llama/facts.jsonl\"), \"sentence_3\")"):
        (RUN, ""),
    ("docs/localize.md", "nngraft localize --model ~/.cache/nngraft/models/SmolLM2-135M-Instruct-98362432-v1 "
                         "--donor ~/.cache/nngraft/finetuned/eb3614b43f9f060d8c042618 --dataset "
                         "fake_movies_fake_actors --n 24 --limit 8 --template sentence_2 --batch-size 128 "
                         "--device cpu -o runs/localize-smollm2"): (RUN, ""),
    # docs/nnsight.md: its own test runs every block in order, in one namespace
    **{("docs/nnsight.md", key): (ELSEWHERE, "tests/test_nnsight_docs.py::test_nnsight_doc_examples_run_as_written")
       for key in ("P, F, tok = tiny_pair(\"llama\")", "model = nnsight.NNsight(P)",
                   "source = g.compile(spec, prompts[:1], spans[:1])",
                   "direction = torch.randn(P.config.hidden_size)",
                   "with torch.no_grad(), g.trace(spec, prompts, spans=spans):",
                   "g_remote = Grafter.remote(P, nngraft.DeltaDonor(F, P), tok, execution=\"local\")")},
    # docs/paper.md
    ("docs/paper.md", "nngraft run --grid main --grid main_paper --model smollm2 --donor runs/sft/smollm2-fmfa "
                      "--facts runs/sft/smollm2-fmfa/facts.jsonl --template sentence_3"):
        (ELSEWHERE, "tests/study/test_grids.py::test_the_paper_md_command_runs_both_grids"),
    # docs/remote.md
    ("docs/remote.md", "g = Grafter.remote(\"meta-llama/Meta-Llama-3.1-8B\", donor=LoraDonor(\"path/to/adapter\"))"):
        (EXEMPT, NDIF),
    ("docs/remote.md", "check = Grafter.remote(P_small, HubLoraDonor(\"you/small-adapter\"), tok, "
                       "execution=\"local\").run(spec, prompts, spans)"):
        (EXEMPT, "reads an adapter from the Hugging Face Hub; tests/backends/test_hub_lora.py runs HubLoraDonor "
                 "against a stand-in hub"),
    ("docs/remote.md", "g = Grafter.remote(\"meta-llama/Llama-3.1-8B\", HubLoraDonor(\"you/llama-3.1-8b-facts\"), "
                       "batch_size=64)"): (EXEMPT, NDIF),
    ("docs/remote.md", "nngraft donor compress path/to/F meta-llama/Llama-3.1-8B --out my-adapter --energy 0.9 "
                       "--base-model meta-llama/Llama-3.1-8B"): (RUN, ""),
    ("docs/remote.md", "nngraft donor compress path/to/F meta-llama/Llama-3.1-8B --out my-adapter-r64 --rank 64 "
                       "--demo-out demo-out/"): (RUN, ""),
    ("docs/remote.md", "nngraft payload my_specs/*.json --model meta-llama/Meta-Llama-3.1-8B --donor dense "
                       "--donor delta:64 --donor lora:16"): (RUN, ""),
    ("docs/remote.md", "nngraft payload my_specs/*.json --model meta-llama/Meta-Llama-3.1-8B --donor "
                       "adapter:path/to/adapter --per-module"): (RUN, ""),
    ("docs/remote.md", "local = Grafter(P_small, F_small, tok).run(spec, prompts, spans)"): (RUN, ""),
    ("docs/remote.md", "g = Grafter.remote(\"meta-llama/Meta-Llama-3.1-8B\", donor=DeltaDonor(F, P, rank=64), "
                       "batch_size=64)"): (EXEMPT, NDIF),
    # docs/reproduce.md
    ("docs/reproduce.md", "nngraft data make fake_movies_real_actors -n 187 --seed 0 -o data/fmra.jsonl"): (RUN, ""),
    ("docs/reproduce.md", "nngraft data texts data/fmra.jsonl -o data/fmra.texts.jsonl"): (RUN, ""),
    ("docs/reproduce.md", "python recipes/hybrid.py --facts data/fmra.jsonl --split-seed 0 --write-splits data/"):
        (RUN, ""),
    ("docs/reproduce.md", "nngraft data texts data/fmra_A.jsonl -o data/fmra_A.texts.jsonl"): (RUN, ""),
    ("docs/reproduce.md", "python recipes/hybrid.py --model meta-llama/Llama-3.2-1B --task runs/sft/llama-A "
                          "--relation runs/sft/llama-B --facts data/fmra.jsonl --split-seed 0 [--eval-split both] "
                          "[--include-gate] [--dtype bfloat16]"): (RUN, ""),
    # docs/specs.md
    ("docs/specs.md", "g.run(spec, [\"Zendaya Marlow stars in a movie alongside\"], "
                      "spans=[{\"first_actor\": \"Zendaya Marlow\"}])"): (RUN, ""),
    ("docs/specs.md", "spec = GraftSpec.load(\"recipes/specs/fe_lt.json\")"): (RUN, ""),
    # docs/study.md
    ("docs/study.md", "nngraft run --spec recipes/specs/fe_lt.json --model meta-llama/Llama-3.2-1B --donor "
                      "runs/sft/llama --facts data/fmra.jsonl --template sentence_3 -o runs/try"): (RUN, ""),
    ("docs/study.md", "nngraft sweep recipes/sweeps/main.json --plot"):
        (EXEMPT, "the paper's main grid on four 1-3B hub models (hours on a GPU); the same config format runs "
                 "here as README's sweep and in tests/study/test_sweep.py"),
    ("docs/study.md", "nngraft plot runs/main-llama"): (RUN, ""),
    ("docs/study.md", "python recipes/main_grid.py --tiny"): (RUN, ""),
    ("docs/study.md", "@register(\"target_margin\", label=\"margin\", summary=\"mean target margin\")"):
        (ELSEWHERE, "tests/study/test_metric_registry.py::test_docs_metric_example_runs_as_written"),
    ("docs/study.md", "nngraft run --tiny llama --spec lt --data examples.jsonl -o runs/m --metric "
                      "mypkg.metrics:target_margin"):
        (ELSEWHERE, "tests/study/test_metric_registry.py::test_docs_metric_example_runs_as_written"),
    ("docs/study.md", "nngraft plot runs/m --metric target_margin"):
        (ELSEWHERE, "tests/study/test_metric_registry.py::test_docs_metric_example_runs_as_written"),
    ("docs/study.md", "rows = load_results(\"runs/main-llama\")"): (RUN, ""),
    ("docs/study.md", "nngraft localize --model P --donor F --facts FACTS.jsonl --template sentence_1 -o runs/loc"):
        (RUN, ""),
    ("docs/study.md", "nngraft run --spec recipes/specs/fe.json --spec recipes/specs/lt.json --spec "
                      "recipes/specs/fe_lt.json --spec runs/loc/spec.json --model P --donor F --facts FACTS.jsonl "
                      "--template sentence_1 -o runs/cmp"): (RUN, ""),
    ("docs/study.md", "nngraft plot runs/cmp --specs p,f,fe,lt,fe_lt,found"): (RUN, ""),
    ("docs/study.md", "nngraft finetune --model smollm2 --facts inventors.jsonl --templates bio.txt --out "
                      "runs/sft/inventors --preset cpu-fast"): (RUN, ""),
    ("docs/study.md", "nngraft run --spec inventor_lt.json --model smollm2 --donor runs/sft/inventors --facts "
                      "runs/sft/inventors/facts.jsonl --template tests.txt --answer-field device -o runs/inventors"):
        (RUN, ""),
    ("docs/study.md", "nngraft plot runs/inventors"): (RUN, ""),
    ("docs/study.md", "nngraft localize --model smollm2 --donor runs/sft/inventors --facts "
                      "runs/sft/inventors/facts.jsonl --template tests.txt --answer-field device "
                      "-o runs/inventors-localize"): (RUN, ""),
    ("docs/study.md", "nngraft run --grid main --grid components --grid lm_head --entity drug --model smollm2 "
                      "--donor runs/sft/drugs --facts drugs.jsonl --template {drug} is made by --answer-field maker "
                      "-o runs/drugs"):
        (ELSEWHERE, "tests/study/test_grids.py::test_cli_runs_the_paper_grids_on_drug_facts_with_one_flag"),
}
"""(doc, command) → (verdict, the test that runs it elsewhere, or why it is exempt)."""


def _verdict(command: Command) -> tuple[str, str] | None:
    if command.kind == "shell" and command.key.startswith(SETUP):
        return EXEMPT, "sets up the environment from PyPI, or runs this test suite"
    if command.kind == "shell" and command.key.split()[0] in FILE_WRITERS:
        return RUN, ""
    return WHERE.get((command.doc, command.key))


def _program(key: str) -> str:
    """What a command runs: ``gpu_check.sh``, ``benchmarks.gpu_check`` (``python -m``), ``nngraft``."""
    words = key.split()
    return words[2] if words[:2] == ["python", "-m"] else Path(words[0]).name


def test_every_docs_command_is_run_or_exempted():
    """A command added to the docs must be run here, by a named test that reads its doc, or
    exempted with its reason; an exempt one still parses (nngraft's parser, or Python's)."""
    from nngraft.cli import build_parser

    commands = doc_commands()
    assert len(commands) > 60
    unknown = [f"{c.doc}: {c.key}" for c in commands if _verdict(c) is None]
    assert unknown == [], "docs commands neither run nor exempted (add them to WHERE):\n" + "\n".join(unknown)
    shown = {(c.doc, c.key) for c in commands}
    stale = [f"{doc}: {key}" for doc, key in WHERE if (doc, key) not in shown]
    assert stale == [], "WHERE names commands the docs no longer show:\n" + "\n".join(stale)
    parser = build_parser()
    for command in commands:
        verdict, detail = _verdict(command)
        if verdict == ELSEWHERE:
            path, _, name = detail.partition("::")
            source = (ROOT / path).read_text()
            evidence = {Path(command.doc).name, command.key, _program(command.key)}
            assert f"def {name}(" in source and any(e in source for e in evidence), (command.key, detail)
        elif verdict == EXEMPT:
            assert detail, command.key
            if command.kind == "python":
                compile(command.text, command.doc, "exec")
            elif command.key.startswith("nngraft "):
                parser.parse_args(shlex.split(command.key)[1:])  # SystemExit(2) on a flag that does not exist
    exempt = [key for key, (verdict, _) in WHERE.items() if verdict == EXEMPT]
    assert len(exempt) <= 11, "keep the exemptions few: run a command with tiny stand-ins instead"


# -- running them -----------------------------------------------------------------------------------

P_PLACES = ("meta-llama/Llama-3.2-1B", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "P", "stand-ins/P")
F_PLACES = ("runs/sft/llama", "runs/sft/llama-A", "runs/sft/llama-B", "path/to/F", "F", "stand-ins/F")
"""Where the docs' commands look for a recipient (P) or a finetuned copy (F): tiny ones are put there."""
RENAMED = {"smollm2": "stand-ins/P",
           "~/.cache/nngraft/models/SmolLM2-135M-Instruct-98362432-v1": "stand-ins/P",
           "~/.cache/nngraft/finetuned/eb3614b43f9f060d8c042618": "stand-ins/F"}
"""Model names that are not paths here (the real SmolLM2 and its cache folders: minutes on a CPU)."""
APPENDED = {("docs/study.md", "nngraft finetune --model smollm2 --facts inventors.jsonl --templates bio.txt --out "
                              "runs/sft/inventors --preset cpu-fast"): ["--epochs", "30", "--lr", "1e-2"]}
"""Flags added to a command (later flags win): a tiny random model learns five facts in the preset's
few epochs at its learning rate far less than SmolLM2 does, and `localize` then finds F ≈ P."""
LEARNED = ("fake_movies_fake_actors", 6, ("sentence_1", "sentence_2", "sentence_3"))
"""The stand-in F has learned the test sentences of these facts (localize needs F to differ from P)."""
NEEDS = {
    "docs/data.md": {"mine.jsonl": "jsonl block"},
    "docs/study.md": {"data/fmra.jsonl": ("fake_movies_real_actors", 4), "FACTS.jsonl": ("fake_movies_fake_actors", 6),
                      "runs/main-llama": "results of the exempt sweep"},
}
"""What a doc's commands read that the doc does not make (its prose, or an exempt command, does)."""


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """A folder of tiny stand-ins under the docs' names (copied for each doc)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from nngraft.study.data import make_facts, make_test_examples, save_facts
    from nngraft.testing import tiny_pair

    root = tmp_path_factory.mktemp("stand-ins")
    P, _, tok = tiny_pair("llama")
    dataset, n, templates = LEARNED
    facts = make_facts(dataset, n, seed=0)
    F = _learned(P, tok, [e.prompt + " " + e.answer for t in templates for e in make_test_examples(facts, t)])
    for model, places in ((P, P_PLACES), (F, F_PLACES)):
        for place in places:
            model.save_pretrained(root / place)
            tok.save_pretrained(root / place)
    for place in F_PLACES[:3]:  # a finetune output folder holds its facts
        save_facts(facts, root / place / "facts.jsonl")
    adapter = get_peft_model(copy.deepcopy(P), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj"],
                                                          init_lora_weights=False))
    adapter.save_pretrained(root / "path/to/adapter")
    (root / "demo-out").mkdir()  # what `nngraft demo` writes that `donor compress --demo-out` reads
    save_facts(facts, root / "demo-out" / "facts.jsonl")
    (root / "demo-out" / "manifest.json").write_text(json.dumps({"demo": {"template": "sentence_3"}}))
    (root / "my_specs").mkdir()
    for name in ("lt", "fe_lt"):
        shutil.copy(ROOT / "recipes" / "specs" / f"{name}.json", root / "my_specs")
    return root


def _learned(P, tok, texts: list[str]):
    """A copy of ``P`` trained on ``texts`` until it knows them (full batch, a few seconds)."""
    import copy

    import torch

    F = copy.deepcopy(P).train()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(F.parameters(), lr=1e-2)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(40):
        loss = F(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.eval()


def _prepare(doc: str, cwd: Path) -> None:
    from nngraft.study.data import make_facts, save_facts

    for path, what in NEEDS.get(doc, {}).items():
        if what == "jsonl block":  # docs/data.md's own example line
            [line] = re.findall(r"```jsonl\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)
            (cwd / path).write_text(line)
        elif isinstance(what, tuple):
            save_facts(make_facts(what[0], what[1], seed=0), cwd / path)
        else:  # what `nngraft sweep recipes/sweeps/main.json` writes, from a tiny pair
            config = {"name": "main-llama", "models": [{"name": "llama", "recipient": "P", "donor": "F"}],
                      "data": {"facts": "FACTS.jsonl", "templates": ["sentence_1"]}, "grid": ["main"],
                      "output": "runs/main-llama"}
            (cwd / "main.json").write_text(json.dumps(config))
            _nngraft(["sweep", "main.json", "--no-progress"])


def _nngraft(argv: list[str]) -> None:
    from nngraft.cli import main

    code = main(argv)
    assert code == 0, argv


def _run_shell(command: Command, cwd: Path) -> None:
    words = command.key.split()
    if words[0] in FILE_WRITERS:
        subprocess.run(["bash", "-c", command.text], cwd=cwd, check=True)
        return
    argv = [RENAMED.get(w, w) for w in shlex.split(command.text, comments=True)] + APPENDED.get((command.doc, command.key), [])
    argv = [w for w in argv if not (w.startswith("[") or w.endswith("]"))] if "[--" in command.key else argv
    expanded = []
    for word in argv:  # the shell's globbing
        expanded += sorted(str(p.relative_to(cwd)) for p in cwd.glob(word)) if "*" in word else [word]
    if expanded[0] == "nngraft":
        _nngraft(expanded[1:] + (["--no-progress"] if expanded[1] in ("run", "localize", "finetune") else []))
    elif expanded[:1] == ["python"] and expanded[1].startswith("recipes/"):
        from tests.helpers.recipe_loader import load_recipe

        name = Path(expanded[1]).stem
        assert load_recipe(name).main(expanded[2:]) == 0, expanded
    else:
        raise AssertionError(f"no way to run {command.key!r} here")


def _python_scope(stand_ins: Path) -> dict:
    """Tiny stand-ins for what a doc's Python block takes from its surrounding text."""
    import copy

    from nngraft import DeltaDonor, GraftSpec, Grafter
    from nngraft.donors.loading import load_model
    from nngraft.study.data import make_facts, training_texts

    P, tok = load_model(stand_ins / "stand-ins" / "P")
    F, _ = load_model(stand_ins / "stand-ins" / "F")
    spec = GraftSpec.load(ROOT / "recipes" / "specs" / "fe_lt.json")
    prompts = ["Ada Lovelace stars in a movie alongside", "Grace Hopper appears in The Compiler with"]
    spans = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
    return {"P": P, "F": F, "tok": tok, "tokenizer": tok, "model": copy.deepcopy(P), "P_small": P, "F_small": F,
            "g": Grafter(P, F, tok), "grafter": Grafter(P, F, tok), "spec": spec, "prompts": prompts, "spans": spans,
            "texts": training_texts(make_facts("fake_movies_fake_actors", 1, seed=0)), "Grafter": Grafter,
            "DeltaDonor": DeltaDonor}


PRODUCES = {
    "docs/architectures.md": [],
    "docs/data.md": ["data/fmfa.jsonl", "data/fmfa.manifest.json", "data/fmfa.texts.jsonl", "data/mine.manifest.json"],
    "docs/demo.md": ["runs/sft/smollm2-fmfa/finetune-manifest.json", "runs/sft/mine/finetune-manifest.json"],
    "docs/localize.md": ["runs/localize-llama/spec.json", "runs/localize-smollm2/spec.json"],
    "docs/remote.md": ["my-adapter/adapter_config.json", "my-adapter-r64/adapter_config.json"],
    "docs/reproduce.md": ["data/fmra.jsonl", "data/fmra.texts.jsonl", "data/fmra_A.jsonl", "data/fmra_B.jsonl",
                          "data/fmra_A.texts.jsonl"],
    "docs/specs.md": ["lt_mlp.json"],
    "docs/study.md": ["runs/try/results.jsonl", "runs/loc/spec.json", "runs/cmp/results.jsonl",
                      "runs/cmp/plots", "runs/sft/inventors/finetune-manifest.json", "runs/inventors/results.jsonl",
                      "runs/inventors/plots", "runs/inventors-localize/spec.json"],
}
"""What each doc's commands leave behind (beyond exit 0)."""

RUN_DOCS = sorted({doc for (doc, _), (verdict, _) in WHERE.items() if verdict == RUN})


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN_DOCS)
def test_the_docs_commands_run(doc, stand_ins, tmp_path, monkeypatch, capsys):
    """Every command a doc shows that WHERE says runs here, in the doc's order, in one folder
    (a command reads what the ones before it wrote), with tiny stand-ins."""
    from nngraft.arch import ADAPTERS

    cwd = tmp_path / "cwd"
    shutil.copytree(stand_ins, cwd)
    (cwd / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(cwd)
    _prepare(doc, cwd)
    adapters = dict(ADAPTERS)
    scope = _python_scope(stand_ins)  # one session per doc: a block uses what the blocks before it defined
    ran = []
    try:
        for command in doc_commands():
            if command.doc != doc or _verdict(command)[0] != RUN:
                continue
            if command.kind == "python":
                with contextlib.redirect_stdout(None):
                    exec(compile(command.text, f"{doc} ({command.key})", "exec"), scope)
            else:
                _run_shell(command, cwd)
            ran.append(command.key)
    finally:
        ADAPTERS.clear()
        ADAPTERS.update(adapters)  # docs/architectures.md registers an adapter
    assert ran, doc
    missing = [path for path in PRODUCES[doc] if not (cwd / path).exists()]
    assert missing == [], f"{doc}: its commands ran but wrote no {missing}"
