"""How many of nngraft's files a reader follows through to see what ``nngraft run`` does with its
arguments: the distinct source files whose functions run (entered), and the distinct climbs back,
a function of one file returning to its caller in another (issue #22's measure of how scattered
the run path is). Counted by :func:`sys.setprofile` during one tiny ``nngraft run`` (a random
4-layer Llama pair, two facts, one template, one spec), in a fresh interpreter per checkout, so
another checkout of nngraft (e.g. a worktree at an older commit) is measured side by side.

    python -m benchmarks.run_path                          # this checkout; prints, writes docs/benchmarks.md
    python -m benchmarks.run_path --checkout before=/tmp/nngraft-old --checkout now=.

Only functions count, not module bodies: whatever runs while a module of nngraft is being imported
(its top-level code, decorators registering verbs, dataclass set-up) is import, not the path of the
arguments, and is skipped, as are the calls Python's import system makes for every import (the
finder of old module paths in ``nngraft.deprecated``, a module's ``__getattr__`` asked for
``__path__``). A climb is counted once per (callee file, caller file) pair; the number
of return events across files is printed beside it. Not timed: the counts do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
HEADING = "## The path of `nngraft run`"
BEGIN = "<!-- run-path:begin -->"
END = "<!-- run-path:end -->"
RUN = ["run", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2", "--template", "sentence_3",
       "--spec", "fe_lt", "--quiet"]
"""The command measured (``-o FOLDER`` is added: a fresh temporary folder)."""

PROBE = r'''
import json, os, sys, tempfile
root, argv = sys.argv[1], json.loads(sys.argv[2])
package = os.path.join(os.path.realpath(root), "nngraft") + os.sep
entered, climbs, state = {}, {}, {"imports": 0, "returns": 0}

def rel(path):
    return path[len(package) - len("nngraft") - 1:]

def profile(frame, event, arg):
    if event not in ("call", "return"):
        return
    code = frame.f_code
    path = os.path.realpath(code.co_filename) if not code.co_filename.startswith("<") else ""
    if not path.startswith(package):
        return
    if code.co_name == "<module>":  # a module of nngraft being imported: not the arguments' path
        state["imports"] += 1 if event == "call" else -1
        return
    if state["imports"]:
        return
    above = frame.f_back
    if above is not None and "importlib._bootstrap" in above.f_code.co_filename:
        return  # called by Python's import system for every import (the finder of old module paths)
    if code.co_name == "__getattr__" and str(frame.f_locals.get("name", "")).startswith("__"):
        return  # the import system probing a module (``__path__``) through its ``__getattr__``
    if event == "call":
        calls = entered.setdefault(rel(path), {})
        calls[code.co_qualname] = calls.get(code.co_qualname, 0) + 1
        return
    caller = frame.f_back
    while caller is not None and caller.f_code.co_filename.startswith("<"):
        caller = caller.f_back
    if caller is None:
        return
    back = os.path.realpath(caller.f_code.co_filename)
    if back.startswith(package) and back != path:
        pair = rel(path) + " -> " + rel(back)
        climbs[pair] = climbs.get(pair, 0) + 1
        state["returns"] += 1

sys.path.insert(0, root)
import nngraft.cli
assert os.path.realpath(nngraft.cli.__file__).startswith(package), nngraft.cli.__file__
out = tempfile.mkdtemp(prefix="run-path-")
sys.setprofile(profile)
try:
    code = nngraft.cli.main(argv + (["-o", os.path.join(out, "run")] if argv[0] == "run" else []))
finally:
    sys.setprofile(None)
print("RESULT=" + json.dumps({"exit": code, "entered": entered, "climbs": climbs, "returns": state["returns"]}))
'''


def measure(checkout: Path, command: list[str] | None = None) -> dict:
    """Run the probe on ``checkout`` (a folder holding ``nngraft/``) in a fresh interpreter: the
    files entered (``{file: {function: calls}}``) and climbs back (``{"callee -> caller": returns}``)
    of ``nngraft COMMAND`` (default :data:`RUN`)."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               PYTHONPATH=str(checkout), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", PROBE, str(checkout), json.dumps(command or RUN)],
                          capture_output=True, text=True, env=env, cwd=checkout, timeout=1200)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT=")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"the probe failed on {checkout}:\n{done.stderr[-3000:]}")
    result = json.loads(line[len("RESULT="):])
    if result["exit"] != 0:
        raise SystemExit(f"nngraft run exited {result['exit']} on {checkout}:\n{done.stderr[-3000:]}")
    return result


MODULE_LINES = 500
"""Issue #22's ceiling on a module's length (``tests/test_layering.py`` enforces it)."""


def floor_of_files(checkout: Path, entered: dict) -> tuple[int, int]:
    """The lines of the files a command entered, and a lower bound on how many files of at most
    :data:`MODULE_LINES` lines could hold them: ``ceil(lines / 500)``, as if the code could be cut
    anywhere and every file filled to the ceiling. Keeping each file whole (one concept, one home)
    needs at least as many (first-fit packing of the 38 files of the run path, whole, takes 24)."""
    lines = sum(len((checkout / path).read_text(encoding="utf-8").splitlines()) for path in entered)
    return lines, -(-lines // MODULE_LINES)


def commit_of(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True)
    return done.stdout.strip()[:70] if done.returncode == 0 else "(not a git checkout)"


def render(rows: list[tuple[str, str, dict]]) -> str:
    lines = [BEGIN, "", "| checkout | commit | files entered | climbs back (distinct) | returns across files | "
             f"lines in those files | files of ≤ {MODULE_LINES} lines they need, at least |",
             "|---|---|---|---|---|---|---|"]
    for label, commit, r in rows:
        lines.append(f"| {label} | {commit.replace('|', '/')} | {len(r['entered'])} | {len(r['climbs'])} | "
                     f"{r['returns']} | {r['lines']} | {r['floor']} |")
    label, _, last = rows[-1]
    lines += ["", f"Files entered by `{label}`, by package (functions only; imports skipped):", ""]
    by_package: dict[str, list[str]] = {}
    for path in sorted(last["entered"]):
        parts = path.split("/")
        by_package.setdefault("/".join(parts[:2]) if len(parts) > 2 else "nngraft", []).append(parts[-1])
    for package, files in sorted(by_package.items()):
        lines.append(f"- `{package}/`: " + ", ".join(files))
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[tuple[str, str, dict]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", action="append", default=[], metavar="LABEL=DIR",
                   help="a checkout of nngraft to measure (repeat; default: this one as 'now')")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file to write the table into")
    p.add_argument("--no-docs", action="store_true", help="print only")
    p.add_argument("--json", type=Path, help="also write every file entered and every climb (with counts) here")
    args = p.parse_args(argv)
    checkouts = [c.partition("=") for c in args.checkout] or [("now", "=", str(ROOT))]
    rows = []
    for label, _, folder in checkouts:
        folder_path = Path(folder).resolve()
        result = measure(folder_path)
        result["lines"], result["floor"] = floor_of_files(folder_path, result["entered"])
        rows.append((label, commit_of(folder_path), result))
        print(f"{label}: {len(result['entered'])} files entered, {len(result['climbs'])} distinct climbs back "
              f"({result['returns']} returns across files); {result['lines']} lines in them, so at least "
              f"{result['floor']} files of <= {MODULE_LINES} lines  [{commit_of(folder_path)}]")
    if args.json:
        args.json.write_text(json.dumps({label: r for label, _, r in rows}, indent=2) + "\n")
    if not args.no_docs:
        from benchmarks.common import replace_docs_section

        replace_docs_section(args.docs, render(rows), BEGIN, END, HEADING)
        print(f"wrote {args.docs}")
    return rows


if __name__ == "__main__":
    main()
