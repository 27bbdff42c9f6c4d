"""Results on disk: a JSONL file (one row per model × spec × example) plus a manifest JSON.

Layout of a results directory::

    results.jsonl    one JSON object per line, appended per finished batch (flush + fsync)
    manifest.json    versions, model identities, spec definitions and hashes, dataset hash,
                     seeds, dtype, dates (rewritten atomically)

Each row holds: ``model``, ``spec``, ``spec_hash``, ``example`` (``fact_id/template``),
``fact_id``, ``template``, ``prompt``, ``answer``, ``target_id``, ``target_text`` (decoded),
``target_token`` (the raw vocabulary piece, e.g. ``"ĠAlan"`` / ``"▁Alan"``), ``prob``,
``logprob``, ``rank`` (0-based), ``top_1``, ``top_5``, … (``rank < k``), ``top_tokens`` /
``top_probs`` (the most likely next tokens), and ``answer_logprob`` / ``answer_tokens`` when the
whole answer was scored. See :mod:`nngraft.study.metrics` for the definitions.

**Resuming.** Opening an existing file with :class:`ResultsWriter` reads the units already done,
so a rerun skips them. If the last line is cut off (the process was killed mid-write), it is
dropped with a warning and the file is truncated to its last complete line before anything is
appended.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with ResultsWriter(d / "results.jsonl") as w:
    ...     w.append([{"model": "m", "spec": "p", "spec_hash": "0", "example": "f1/t", "prob": 0.5}])
    1
    >>> [r["prob"] for r in load_results(d / "results.jsonl")]
    [0.5]
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import GraftError

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".nngraft-lock"
OWNER_FILE = ".nngraft-output"  # which command writes into a folder (see output_folder)
MANIFEST_FORMAT = "nngraft.results"
FORMAT_VERSION = 1

UnitKey = tuple[str, str, str]
"""(model, spec name, example key): one row of the results."""


class ResultsError(GraftError, ValueError):
    """A results file or manifest is unreadable, or does not match the run that wants to extend it."""


class OutputInUseError(ResultsError):
    """Another nngraft run is writing to the same output folder right now."""


class TruncatedResultsWarning(UserWarning):
    """The last line of a results file was incomplete (a killed run) and was dropped."""


def unit_key(row: Mapping[str, Any]) -> UnitKey:
    return (str(row["model"]), str(row["spec"]), str(row["example"]))


def results_path(path: str | Path) -> Path:
    """``path`` itself if it is a file (or ends in .jsonl), else ``path/results.jsonl``."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix != ".jsonl"):
        return path / RESULTS_FILE
    return path


def manifest_path(results: str | Path) -> Path:
    return results_path(results).parent / MANIFEST_FILE


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int, tuple[int, str] | None]:
    """Rows, the byte length of the complete part, and the dropped tail as (line number, text)
    if the file was cut off."""
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not raw.strip():
            if not is_last:
                good += len(raw) + 1
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if is_last or all(not rest.strip() for rest in lines[number:]):
                return rows, good, (number, raw.decode(errors="replace"))
            raise ResultsError(f"{path}: line {number} is not a JSON object ({error}); the file is "
                               "damaged in the middle, not just at the end. Nothing was changed: "
                               "delete that line (its row is then recomputed) or use a new output "
                               "directory") from None
        if is_last:  # valid JSON but no newline: the writer died before the "\n"
            return rows, good, (number, raw.decode(errors="replace"))
        rows.append(row)
        good += len(raw) + 1
    return rows, good, None


class ResultRows(list):
    """The rows of a results file: a plain list of dicts, plus :meth:`to_dataframe`."""

    def to_dataframe(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (``pip install "nngraft[pandas]"``)."""
        return to_dataframe(self)

    def _repr_html_(self) -> str:
        """In Jupyter: per model and spec (in file order), the rows and their mean answer
        probability, top-1 rate and recovery (where the rows have them)."""
        from ..util.html import html_table

        groups: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
        for row in self:
            groups.setdefault((row.get("model"), row.get("spec")), []).append(row)

        def mean(rows: list[Mapping[str, Any]], key: str) -> float | None:
            values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            return sum(values) / len(values) if values else None

        table = [[model, spec, len(rows), mean(rows, "prob"), mean(rows, "top_1"), mean(rows, "recovery")]
                 for (model, spec), rows in groups.items()]
        return html_table(["model", "spec", "rows", "mean prob", "top-1", "mean recovery"], table,
                          caption=f"{len(self)} result rows", max_rows=60)


def load_results(path: str | Path) -> ResultRows:
    """All complete rows of a results file (or directory) as dicts (a list;
    ``load_results(path).to_dataframe()`` gives a pandas DataFrame); a cut-off last line is
    dropped with a :class:`TruncatedResultsWarning`.

    The file is not modified (:class:`ResultsWriter` repairs it when a run resumes)."""
    path = results_path(path)
    if not path.exists():
        raise ResultsError(f"no results file at {path}")
    rows, _, tail = _read_lines(path)
    if tail is not None:
        warnings.warn(f"{path}: line {tail[0]}: dropped an incomplete last line ({len(tail[1])} characters; "
                      "the run was probably killed mid-write)", TruncatedResultsWarning, stacklevel=2)
    return ResultRows(rows)


def to_dataframe(rows_or_path: Sequence[Mapping[str, Any]] | str | Path) -> Any:
    """The rows as a ``pandas.DataFrame`` (needs pandas: ``pip install pandas``).

    Example:
        >>> df = to_dataframe("runs/main")  # doctest: +SKIP
        >>> df.groupby(["model", "spec"]).prob.mean()  # doctest: +SKIP
    """
    try:
        import pandas as pd
    except ModuleNotFoundError:
        raise ResultsError("to_dataframe needs pandas; install it with `pip install \"nngraft[pandas]\"` "
                           "(or use load_results, which returns plain dicts)") from None
    rows = load_results(rows_or_path) if isinstance(rows_or_path, (str, Path)) else list(rows_or_path)
    return pd.DataFrame(rows)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise it as usual. Only in the
    main thread, where Python handles signals; elsewhere the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


class ResultsWriter:
    """Append rows to a results JSONL file, durably, skipping units already there.

    On open: reads the existing rows (their units are :attr:`done`), and if the last line is cut
    off, warns and truncates the file to its last complete line. :meth:`append` writes one batch
    of rows with a single write, then flush + fsync, so a crash loses at most the batch in
    flight (and leaves at worst a cut-off line, repaired on the next open).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = results_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.existing: list[dict[str, Any]] = []
        self.dropped_tail: str | None = None  # the text of a cut-off last line
        if self.path.exists():
            rows, good, tail = _read_lines(self.path)
            self.existing = rows
            if tail is not None:
                self.dropped_tail = tail[1]
                warnings.warn(f"{self.path}: line {tail[0]}: dropped an incomplete last line "
                              f"({len(tail[1])} characters; the previous run was probably killed "
                              "mid-write); its unit will be rerun",
                              TruncatedResultsWarning, stacklevel=2)
                with open(self.path, "r+b") as handle:
                    handle.truncate(good)
                    handle.flush()
                    os.fsync(handle.fileno())
        self.done: dict[UnitKey, dict[str, Any]] = {}
        for row in self.existing:
            self.done[unit_key(row)] = row
        self._handle = open(self.path, "a", encoding="utf-8")
        self.written = 0

    def append(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Write ``rows`` (one batch) durably; returns how many were written."""
        rows = list(rows)
        if not rows:
            return 0
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n" for row in rows)
        with _ctrl_c_deferred():  # a batch is written and counted whole, or not at all
            self._handle.write(text)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            for row in rows:
                self.done[unit_key(row)] = dict(row)
            self.written += len(rows)
        return len(rows)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_manifest(results: str | Path) -> dict[str, Any]:
    """The manifest next to a results file (``{}`` if there is none)."""
    path = manifest_path(results)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ResultsError(f"{path} is not valid JSON: {error}") from None


def write_manifest(results: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write the manifest next to ``results`` atomically (temp file + rename)."""
    from ..util.io import atomic_write_text

    return atomic_write_text(manifest_path(results), json.dumps(manifest, indent=2, ensure_ascii=False,
                                                               default=str) + "\n")


_ROW_KEYS = ("model", "spec", "example")


def check_output(results: str | Path) -> Path:
    """Refuse to write results where they would clobber or sit beside someone else's file: an
    existing ``results`` file must be an nngraft results file (every complete line a row with
    ``model``, ``spec`` and ``example``), and an existing manifest beside it an nngraft results
    manifest. Returns the results file's path. Nothing is written."""
    path = results_path(results)
    if path.exists() and not path.is_file():
        raise ResultsError(f"cannot write results to {path}: it exists and is not a file")
    if path.is_file() and path.stat().st_size:
        what = "" if path.suffix == ".jsonl" else " (and its name does not end in .jsonl)"
        try:
            rows, _, tail = _read_lines(path)
        except ResultsError:  # damaged in the middle: say so if it is a results file, else refuse it
            if path.suffix == ".jsonl" and _is_row(path.read_bytes().split(b"\n", 1)[0]):
                raise
            rows, tail = [], (1, "")
        foreign = [r for r in rows if not all(k in r for k in _ROW_KEYS)]
        if (not rows and tail is not None) or foreign or path.suffix != ".jsonl":
            raise ResultsError(
                f"refusing to write results into {path}: it is not an nngraft results file{what}, and "
                "nngraft never overwrites or appends to other files. Give a new or an nngraft results "
                "directory with -o (or 'output' in a sweep config)")
    manifest = manifest_path(path)
    if manifest.exists():
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            record = None
        if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
            raise ResultsError(
                f"refusing to write results to {path}: {manifest} exists and is not an nngraft results "
                "manifest (nngraft would overwrite it). Give a new directory with -o (or 'output' in a "
                "sweep config)")
    return path


def _is_row(line: bytes) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and all(k in row for k in _ROW_KEYS)


def _holder(fd: int) -> str:
    """Who holds an output lock, as its lock file records it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode("utf-8"))
        return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
                f"{record.get('command')}")
    except (ValueError, OSError, AttributeError):
        return "its lock file gives no details"


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on an output folder while a run writes there; a
    second run on the same folder gets :class:`OutputInUseError` naming the first (pid, host,
    start time, command). The OS releases the lock when the process ends, even on a crash, so a
    killed run never blocks the next one.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> with output_lock(folder):
        ...     with output_lock(folder):  # doctest: +ELLIPSIS
        ...         pass
        Traceback (most recent call last):
        ...
        nngraft.study.results.OutputInUseError: ... is in use by another nngraft run (pid ...
    """
    import datetime
    import socket
    import sys

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not a POSIX system: no lock
        yield Path(folder)
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ResultsError(f"cannot use {folder} as the output directory: a file of that name exists") from None
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            raise ResultsError(f"cannot write to the output directory {folder}: permission denied; give "
                               "a directory you may write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputInUseError(
                f"{folder} is in use by another nngraft run ({holder}). Two runs writing one results "
                "file would each write every row; wait for that run to finish (or stop it), or give "
                "another output directory") from None
        try:  # the file we locked must still be the one at `path` (a finishing run unlinks it)
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["nngraft", *sys.argv[1:]]) if sys.argv else "?"}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode("utf-8"))
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock
        os.close(fd)


def _folder_owner(folder: Path) -> str | None:
    try:
        record = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("command") if isinstance(record, dict) else None


def check_output_folder(folder: str | Path, command: str, *, flag: str, ours: Any = None) -> Path:
    """Refuse to write ``command``'s files into ``folder`` when it holds anything that command did
    not write: it must be new, empty, marked as ``command``'s (:data:`OWNER_FILE`), or recognised
    by ``ours(folder)`` (a folder written before the mark existed). Raises
    :class:`~nngraft.errors.OutputExistsError` naming the folder, a few of its files, and ``flag``."""
    from ..errors import OutputExistsError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"cannot write into {folder}: it exists and is not a directory; give a new "
                                f"directory with {flag}")
    if not folder.is_dir():
        return folder
    entries = sorted(e.name for e in folder.iterdir() if e.name not in (OWNER_FILE, LOCK_FILE))
    owner = _folder_owner(folder)
    if not entries or owner == command or (owner is None and ours is not None and ours(folder)):
        return folder
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    by = f" (it is `nngraft {owner}`'s output)" if owner else ""
    raise OutputExistsError(
        f"refusing to write into {folder}: it holds files that `nngraft {command}` did not write ({shown}){by}, "
        f"and nngraft never overwrites other files. Give a new or empty directory with {flag}")


@contextlib.contextmanager
def output_folder(folder: str | Path, command: str, *, flag: str, ours: Any = None) -> Iterator[Path]:
    """Write ``command``'s files into ``folder``: check it (:func:`check_output_folder`), hold its
    OS lock (:func:`output_lock`) while writing, and mark it as ``command``'s so a rerun may
    replace its own files.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> with output_folder(folder, "plot", flag="-o") as out:
        ...     _ = (out / "a.png").write_text("figure")
        >>> with output_folder(folder, "localize", flag="-o"):  # doctest: +ELLIPSIS
        ...     pass
        Traceback (most recent call last):
        ...
        nngraft.errors.OutputExistsError: refusing to write into ...: it holds files that `nngraft localize` did not write (a.png) (it is `nngraft plot`'s output), ...
    """
    from ..util.io import atomic_write_text

    folder = check_output_folder(folder, command, flag=flag, ours=ours)
    with output_lock(folder):
        check_output_folder(folder, command, flag=flag, ours=ours)  # again, now that no one else writes
        if _folder_owner(folder) != command:
            atomic_write_text(folder / OWNER_FILE, json.dumps({"command": command}) + "\n")
        yield folder
