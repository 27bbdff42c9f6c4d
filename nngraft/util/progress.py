"""The progress bar of long grafting runs (``Grafter.run_grid(..., progress=True)``)."""

from __future__ import annotations

from typing import Any


class row_progress:
    """A rich progress bar over rows (spec × prompt), with rows/s and time left, on stderr. Drawn
    live on a terminal or in a notebook; elsewhere (pipes, logs) one line when done."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(stderr=True)
        live = console.is_terminal or console.is_jupyter
        self.progress = Progress(TextColumn("grafting"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=live,
                                 console=console, disable=not live)
        self.console, self.live, self.total = console, live, total
        self.task = self.progress.add_task("grafting", total=total)

    def __enter__(self):
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()
        if not self.live and exc[0] is None:
            elapsed = self.progress.tasks[0].elapsed or 0.0
            self.console.print(f"grafted {self.total} rows in {elapsed:.1f} s", highlight=False)
