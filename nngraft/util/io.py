"""Small file helpers that never leave a half-written file behind."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


_UMASK_LOCK = threading.Lock()


def _mode_for(path: Path) -> int:
    """The permission bits a rewritten ``path`` gets: its current ones if it exists, else what a
    new file gets under the process's umask (``mkstemp`` alone would give 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so other threads are kept out meanwhile)."""
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


@contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temp file name beside ``path``; renamed onto ``path`` when the block ends normally,
    deleted when it raises (even on Ctrl-C)."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (give a file path)", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync, then rename.

    A reader sees either the old file or the whole new one, never a truncated one.
    """
    path = Path(path)
    with _replacing(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def atomic_save_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> Path:
    """``fig.savefig(path)`` via a temp file in the same folder and a rename, so a killed run never
    leaves a half-written image where a finished one is expected. The format comes from ``path``'s
    suffix unless ``format=`` is given.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, tempfile, pathlib
        >>> fig = plt.figure(); out = pathlib.Path(tempfile.mkdtemp()) / "plot.png"
        >>> atomic_save_figure(fig, out).read_bytes()[:4] == b"\\x89PNG"
        True
    """
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with _replacing(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path


def refuse_foreign_file(path: str | Path, ours: Any, *, command: str, flag: str) -> Path:
    """Refuse to overwrite ``path`` unless it is absent or ``ours(text)`` says ``command`` wrote it
    (a rerun replaces its own output). Raises :class:`~nngraft.errors.OutputExistsError` naming
    the file, what nngraft would do, and the option (``flag``) to change.

    Example:
        >>> import tempfile, pathlib
        >>> notes = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
        >>> _ = notes.write_text("my notes")
        >>> refuse_foreign_file(notes, lambda text: text.startswith("{"), command="schema", flag="-o")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nngraft.errors.OutputExistsError: refusing to overwrite .../notes.txt: ...
    """
    from ..errors import OutputExistsError

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_dir():  # the writer's own error names it (IsADirectoryError)
        return path
    try:
        text = path.read_bytes().decode("utf-8")
        known = bool(ours(text))
    except Exception:  # unreadable, not UTF-8, not what we write: not ours
        known = False
    if not known:
        raise OutputExistsError(
            f"refusing to overwrite {path}: it exists and is not a file `nngraft {command}` wrote, and nngraft "
            f"never overwrites other files. Give a new path with {flag} (or move that file away)")
    return path
