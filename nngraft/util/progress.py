"""Progress that works wherever a long run's output goes: a live rich bar on a terminal (and in a
notebook that has ipywidgets), plain lines elsewhere.

Rich draws its bar live only on a terminal; in a Jupyter kernel it needs ``ipywidgets`` (without
it, rich warns and leaves an empty cell), and on a file or pipe it prints nothing until the end.
:func:`progress_bar` picks: a live :class:`rich.progress.Progress` where it can be drawn, else a
:class:`LineProgress` that prints one line per tenth of a task (and at least one a minute while a
task advances): ``grafting: 120/480 rows (25%), elapsed 33.1 s, left ~99 s``. Both take the same
calls (``add_task``, ``advance``, ``update``, ``remove_task``, ``console``, a ``with`` block).

Example:
    >>> import io
    >>> from rich.console import Console
    >>> log = io.StringIO()
    >>> with progress_bar(console=Console(file=log, width=100)) as bar:
    ...     task = bar.add_task("grafting", total=4, unit="rows")
    ...     for _ in range(4):
    ...         bar.advance(task, 1)
    >>> print(log.getvalue().splitlines()[-1])  # doctest: +ELLIPSIS
    grafting: 4/4 rows (100%), elapsed ... s
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

LINE_EVERY_S = 60.0
"""A line at least this often (seconds) while a task advances, between its tenths (the environment
variable ``NNGRAFT_PROGRESS_EVERY`` overrides it, e.g. ``10`` for a busier log)."""


def line_every_s() -> float:
    """:data:`LINE_EVERY_S`, or ``NNGRAFT_PROGRESS_EVERY`` seconds when that is set to a number ≥ 0."""
    try:
        value = float(os.environ.get("NNGRAFT_PROGRESS_EVERY", LINE_EVERY_S))
    except ValueError:
        return LINE_EVERY_S
    return value if value >= 0 else LINE_EVERY_S


def has_ipywidgets() -> bool:
    """Whether ``ipywidgets`` (which rich's and tqdm's notebook bars need) is installed."""
    return importlib.util.find_spec("ipywidgets") is not None


def can_draw_live(console: Any) -> bool:
    """Whether a live bar can be drawn on ``console``: a real terminal, or a notebook with
    ipywidgets. Elsewhere (a file, a pipe, a notebook without ipywidgets) use lines."""
    if console.is_terminal and not console.is_dumb_terminal:
        return True
    return bool(console.is_jupyter) and has_ipywidgets()


def quiet_notebook_tqdm() -> None:
    """In an IPython kernel without ipywidgets, importing ``tqdm.auto`` (as huggingface_hub and
    transformers do) warns "IProgress not found"; import it once here with that warning silenced
    (tqdm then falls back to its text bar). Nothing happens outside IPython."""
    if "IPython" not in sys.modules or "tqdm.autonotebook" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IProgress not found.*")
        warnings.filterwarnings("ignore", message=".*ipywidgets.*")
        try:
            import tqdm.autonotebook  # noqa: F401
        except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
            pass


@dataclass
class LineTask:
    """One task of a :class:`LineProgress` (the fields rich's ``Task`` has that callers read)."""

    id: int
    description: str
    total: float | None
    completed: float = 0.0
    unit: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    start_time: float = field(default_factory=time.monotonic)
    finished_time: float | None = None
    last_line: float = field(default_factory=time.monotonic)
    tenths: int = 0

    @property
    def elapsed(self) -> float:
        return (self.finished_time or time.monotonic()) - self.start_time

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total


class LineProgress:
    """Progress as plain lines on ``console`` (for files, pipes and notebooks without ipywidgets):
    a line at each tenth of a task's total, at least every :func:`line_every_s` seconds while it
    advances, and when it completes (a task done in one step: one line). ``tenths=False``: only the
    timed lines (for many short tasks whose callers log each one). ``disable=True`` prints nothing."""

    def __init__(self, console: Any, *, disable: bool = False, every_s: float | None = None,
                 tenths: bool = True) -> None:
        self.every_s = line_every_s() if every_s is None else every_s
        self.console, self.disable, self.tenths = console, disable, tenths
        self.tasks: list[LineTask] = []
        self._by_id: dict[int, LineTask] = {}

    # the calls rich's Progress takes ---------------------------------------------------------
    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, *,
                 unit: str = "", start: bool = True, visible: bool = True, **fields: Any) -> int:
        task = LineTask(len(self._by_id), description, total, float(completed), unit, dict(fields))
        task.tenths = int(10 * task.completed / total) if total else 0
        self._by_id[task.id] = task
        self.tasks.append(task)
        return task.id

    def remove_task(self, task_id: int) -> None:
        task = self._by_id.pop(task_id, None)
        if task is not None:
            self.tasks.remove(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self._by_id[task_id]
        before = task.completed
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = float(completed)
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        fields.pop("refresh", None)
        fields.pop("visible", None)
        task.fields.update(fields)
        if task.completed != before:
            self._maybe_line(task)

    # the lines -----------------------------------------------------------------------------------
    def line(self, task: LineTask) -> str:
        done = f"{task.completed:,.0f}"
        unit = f" {task.unit}" if task.unit else ""
        if task.total:
            pct = min(100.0, 100.0 * task.completed / task.total)
            text = f"{task.description}: {done}/{task.total:,.0f}{unit} ({pct:.0f}%), elapsed {task.elapsed:.1f} s"
            if 0 < task.completed < task.total:
                left = task.elapsed * (task.total - task.completed) / task.completed
                text += f", left ~{left:.0f} s"
            return text
        return f"{task.description}: {done}{unit}, elapsed {task.elapsed:.1f} s"

    def _maybe_line(self, task: LineTask) -> None:
        now = time.monotonic()
        if task.finished and task.finished_time is None:
            task.finished_time = now
        tenths = int(10 * task.completed / task.total) if task.total else 0
        due = (self.tenths and tenths > task.tenths) or now - task.last_line >= self.every_s
        if task.tenths >= 10:  # the completing line is printed once
            due = False
        if not due:
            return
        task.tenths = max(task.tenths, tenths)
        task.last_line = now
        if not self.disable:
            self.console.print(self.line(task), highlight=False, markup=False)


def progress_bar(*columns: Any, console: Any = None, disable: bool = False, transient: bool = False,
                 every_s: float | None = None, tenths: bool = True) -> Any:
    """A live rich ``Progress(*columns)`` where :func:`can_draw_live` (``transient``: it vanishes
    when done), else a :class:`LineProgress` on the same console. ``console`` defaults to stderr.
    Tasks may carry ``unit="rows"`` (shown in the lines; rich ignores it); ``tenths`` and
    ``every_s`` are :class:`LineProgress`'s."""
    from rich.console import Console
    from rich.progress import Progress

    console = console if console is not None else Console(stderr=True)
    if disable or not can_draw_live(console):
        return LineProgress(console, disable=disable, every_s=every_s, tenths=tenths)
    return Progress(*columns, console=console, transient=transient)


class row_progress:
    """The progress of ``Grafter.run_grid(..., progress=True)``: rows (spec × prompt) done, with
    rows/s and time left, on stderr. Drawn live on a terminal (or in a notebook with ipywidgets);
    elsewhere (pipes, logs, a notebook without ipywidgets) one line per tenth of the rows."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = progress_bar(TextColumn("grafting"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                                     TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=True)
        self.task = self.progress.add_task("grafting", total=total, unit="rows")

    def __enter__(self):
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()
