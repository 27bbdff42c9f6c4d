"""Progress wherever the output goes (nngraft.util.progress): a live bar on a terminal, plain lines
in a log file, a pipe or a notebook without ipywidgets; no warnings on import, in a notebook kernel
either."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console
from rich.progress import Progress

from nngraft.util import progress as progress_module
from nngraft.util.progress import LineProgress, can_draw_live, line_every_s, progress_bar
from tests.helpers import ROOT


def log_console() -> tuple[Console, io.StringIO]:
    log = io.StringIO()
    return Console(file=log, width=200), log


def test_lines_at_each_tenth_and_one_when_done():
    console, log = log_console()
    with progress_bar(console=console, every_s=3600) as bar:
        assert isinstance(bar, LineProgress)
        task = bar.add_task("grafting", total=20, unit="rows")
        for _ in range(20):
            bar.advance(task, 1)
        bar.advance(task, 0)  # no new line once done
    lines = log.getvalue().splitlines()
    assert [line.split(", elapsed")[0] for line in lines] == [
        f"grafting: {2 * k}/20 rows ({10 * k}%)" for k in range(1, 11)]
    assert re.fullmatch(r"grafting: 2/20 rows \(10%\), elapsed \d+\.\d s, left ~\d+ s", lines[0])
    assert re.fullmatch(r"grafting: 20/20 rows \(100%\), elapsed \d+\.\d s", lines[-1])


def test_a_task_done_in_one_step_prints_one_line_and_resumed_tasks_count_from_where_they_were():
    console, log = log_console()
    bar = LineProgress(console, every_s=3600)
    task = bar.add_task("sweep", total=10, completed=5, unit="rows")  # resuming: half done already
    bar.advance(task, 1)
    bar.advance(task, 4)
    first = bar.add_task("grid", total=4)
    bar.update(first, completed=4)
    assert [line.split(", elapsed")[0] for line in log.getvalue().splitlines()] == [
        "sweep: 6/10 rows (60%)", "sweep: 10/10 rows (100%)", "grid: 4/4 (100%)"]


def test_timed_lines_only_and_disabled():
    console, log = log_console()
    bar = LineProgress(console, every_s=0, tenths=False)
    task = bar.add_task("step 3: layers", total=100, unit="rows", epoch="1/2")
    bar.update(task, completed=1, epoch="2/2")
    bar.update(task, total=100)  # nothing advanced: no line
    assert log.getvalue().splitlines()[0].startswith("step 3: layers: 1/100 rows (1%), elapsed ")
    assert len(log.getvalue().splitlines()) == 1 and bar.tasks[0].fields["epoch"] == "2/2"
    bar.remove_task(task)
    assert bar.tasks == []
    quiet, quiet_log = log_console()
    with progress_bar(console=quiet, disable=True) as off:
        off.advance(off.add_task("x", total=1))
    assert quiet_log.getvalue() == ""


def test_every_s_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NNGRAFT_PROGRESS_EVERY", "5")
    assert line_every_s() == 5.0 and LineProgress(Console()).every_s == 5.0
    for bad in ("soon", "-1"):
        monkeypatch.setenv("NNGRAFT_PROGRESS_EVERY", bad)
        assert line_every_s() == 60.0


def test_live_bar_on_a_terminal_and_in_a_notebook_only_with_ipywidgets(monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert can_draw_live(terminal) and isinstance(progress_bar(console=terminal), Progress)
    notebook = Console(file=io.StringIO(), force_jupyter=True)
    monkeypatch.setattr(progress_module, "has_ipywidgets", lambda: False)
    assert not can_draw_live(notebook) and isinstance(progress_bar(console=notebook), LineProgress)
    monkeypatch.setattr(progress_module, "has_ipywidgets", lambda: True)
    assert can_draw_live(notebook)
    assert not can_draw_live(Console(file=io.StringIO()))  # a file


def run_python(code: str, warnings: str = "error", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", warnings, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_no_warning_on_import_even_in_a_notebook_kernel_without_ipywidgets():
    """tqdm.auto (which transformers loads) warns "IProgress not found" in a Jupyter kernel
    without ipywidgets; ``import nngraft`` silences it. The kernel is faked the way tqdm detects
    one (ipykernel's shell module loaded, an IPython module with a shell). tqdm swallows its own
    warning under -W error, so here every warning is printed (-W always) and stderr must be empty."""
    assert run_python("import nngraft").returncode == 0
    if progress_module.has_ipywidgets():
        pytest.skip("ipywidgets is installed: tqdm has no reason to warn")
    fake_kernel = """
        import sys, types
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: types.SimpleNamespace(config={"IPKernelApp": {}})
        sys.modules["IPython"] = ipython
        sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
    """
    fake_kernel = textwrap.dedent(fake_kernel)
    without = run_python(fake_kernel + "import tqdm.auto\n", "always")  # the warning this guards against
    assert without.returncode == 0 and "IProgress not found" in without.stderr
    done = run_python(fake_kernel + "import nngraft\nimport tqdm.auto\nprint('imported')\n", "always")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "imported\n" and done.stderr == ""


@pytest.mark.slow
def test_commands_log_progress_lines_when_stderr_is_a_file(tmp_path):
    """`nngraft run` (a sweep) and `localize` with stderr to a file: progress as lines (rows,
    percent, elapsed), no terminal escapes. (finetune's lines: tests/test_any_schema.py.)"""
    data = ["--dataset", "fake_movies_fake_actors", "--n", "3", "--template", "sentence_1"]
    commands = {
        "run": ["run", "--tiny", "llama", "--spec", "recipes/specs/fe_lt.json", *data, "-o", str(tmp_path / "r")],
        "localize": ["localize", "--tiny", "llama", *data, "--targets", "donor_top1", "--metric", "logprob",
                     "--target", "0.5", "-o", str(tmp_path / "loc"), "--no-plot"],
    }
    logs = {}
    for name, argv in commands.items():
        with open(tmp_path / f"{name}.log", "w") as err:
            done = subprocess.run([sys.executable, "-m", "nngraft.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=err, env={**os.environ, "NNGRAFT_PROGRESS_EVERY": "0"}, timeout=600)
        logs[name] = (tmp_path / f"{name}.log").read_text()
        assert done.returncode == 0, logs[name]
        assert "\x1b[" not in logs[name]  # no cursor movement or colour in a log file
    assert re.search(r"^tiny-llama: 3 specs × 3 examples: 9/9 rows \(100%\), elapsed \d+\.\d s$", logs["run"], re.M)
    assert re.search(r"^step 1: baselines \(P, F, every unit\): 9/9 rows \(100%\), elapsed \d+\.\d s$",
                     logs["localize"], re.M)
