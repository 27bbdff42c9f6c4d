"""Files in and out: reading the user's files with one clear error for every way a file can be
bad, and writing files that never leave a half-written file behind.

**Reading.** A missing file, a directory where a file is expected, a file we may not read, text that
is not UTF-8 (latin-1, UTF-16 …) and JSON objects that give one key twice (where plain JSON parsers
keep the last value silently) all raise the caller's error type (``SpecError``, ``DataError`` …)
with a message that names the file and says what to do (:func:`read_text`, :func:`loads_json`).

**Writing.** :func:`atomic_write_text` writes a temporary file beside the target and renames it
over, keeping the target's permissions.

Example:
    >>> from nngraft.errors import SpecError
    >>> loads_json('{"rules": [], "rules": [1]}', "spec.json", SpecError)
    Traceback (most recent call last):
    ...
    nngraft.errors.SpecError: spec.json: the key 'rules' occurs twice in one JSON object (line 1); JSON keeps only the last one silently, so nngraft refuses it: remove one of them
"""


from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import GraftError, ModelLoadError


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


# Reading the user's files

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


def read_text(path: str | Path, what: str, error: type[GraftError] = GraftError) -> str:
    """The UTF-8 text of the file at ``path`` (``what`` names it in messages, e.g. "spec file").

    Raises ``error`` for a missing file, a directory, no permission, or text that is not UTF-8
    (a UTF-8 byte-order mark is accepted and dropped)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"cannot read {what} {path}: no such file") from None
    except IsADirectoryError:
        raise error(f"cannot read {what} {path}: it is a directory; give the path of a file") from None
    except PermissionError:
        raise error(f"cannot read {what} {path}: permission denied (check the file's permissions)") from None
    except OSError as problem:
        raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
    return decode_utf8(data, f"{what} {path}", error)


def decode_utf8(data: bytes, source: str, error: type[GraftError] = GraftError) -> str:
    """``data`` decoded as UTF-8, or ``error`` naming ``source``, the encoding it looks like, and the
    position of the first bad byte."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise error(f"{source} is encoded as {name}; nngraft reads UTF-8 text. Convert it, e.g. "
                        f"`iconv -f {name} -t UTF-8 FILE > NEW`, or save it as UTF-8 in your editor")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = data[:problem.start].count(b"\n") + 1
        raise error(f"{source} is not UTF-8 text (byte 0x{data[problem.start]:02x} on line {line} cannot be "
                    "decoded; latin-1 or Windows-1252 text?). nngraft reads UTF-8: convert it, e.g. "
                    "`iconv -f latin1 -t UTF-8 FILE > NEW`") from None


def _no_duplicates(source: str, error: type[GraftError], text: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise error(f"{source}: the key {key!r} occurs twice in one JSON object{_line_of(text, key)}; "
                            "JSON keeps only the last one silently, so nngraft refuses it: remove one of them")
            seen[key] = value
        return seen

    return hook


def _line_of(text: str, key: str) -> str:
    """`` (line N)`` of the second occurrence of ``"key"`` in ``text`` (best effort)."""
    needle = json.dumps(key)
    first = text.find(needle)
    second = text.find(needle, first + 1) if first >= 0 else -1
    if second < 0:
        return ""
    return f" (line {text.count(chr(10), 0, second) + 1})"


def loads_json(text: str, source: str, error: type[GraftError] = GraftError) -> Any:
    """``json.loads(text)`` that refuses an object giving one key twice; bad JSON raises ``error``
    naming ``source`` and the position."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(source, error, text))
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as problem:
        raise error(f"{source}: not valid JSON ({problem.msg} at line {problem.lineno}, column "
                    f"{problem.colno})") from None


def check_no_duplicate_keys(text: str | bytes, source: str, error: type[GraftError] = GraftError) -> None:
    """Raise ``error`` if a JSON object in ``text`` gives a key twice; invalid JSON is left to the
    caller's own parser (so its message stays as it was)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return
    try:
        json.loads(text, object_pairs_hook=_no_duplicates(source, error, text))
    except (json.JSONDecodeError, RecursionError):
        return


@contextlib.contextmanager
def loading_model(what: str, source: str) -> Iterator[None]:
    """Turn a failure to load ``what`` (e.g. "the recipient") from ``source`` — no such folder, a
    folder that holds no model, a hub id not in the cache while offline, a bad config — into a
    :class:`~nngraft.errors.ModelLoadError` naming it and saying what to give instead."""
    try:
        yield
    except GraftError:
        raise
    except (OSError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise ModelLoadError(
            f"cannot load {what} from {source!r} ({type(error).__name__}: {detail}). Give a local model "
            "folder (with config.json), or a hub id that is already in the Hugging Face cache: nngraft does "
            "not download models at run time") from None


class _DuplicateKeyGuard:
    """A pydantic model's validator whose ``validate_json`` first refuses duplicate keys (JSON keeps
    the last one silently); everything else is the model's own validator."""

    def __init__(self, inner: Any, source: str, error: type[GraftError]) -> None:
        self._inner, self._source, self._error = inner, source, error

    def validate_json(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, (str, bytes, bytearray)):
            check_no_duplicate_keys(bytes(data) if isinstance(data, bytearray) else data, self._source, self._error)
        return self._inner.validate_json(data, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return repr(self._inner)


def refuse_duplicate_keys(model: Any, error: type[GraftError]) -> Any:
    """Make every JSON door of the pydantic ``model`` class refuse an object that gives one key twice:
    ``model.model_validate_json`` and ``TypeAdapter(model).validate_json`` (both run the model's
    validator), as the file readers do. (A model nested in *another* model's JSON is parsed by that
    model's validator: read such files with :func:`loads_json`.) Returns ``model`` (a decorator).

    Example:
        >>> from pydantic import BaseModel
        >>> from nngraft.errors import SpecError
        >>> class C(BaseModel):
        ...     a: int
        >>> C.model_validate_json(refuse_duplicate_keys(C, SpecError) and '{"a": 1, "a": 2}')
        Traceback (most recent call last):
        ...
        nngraft.errors.SpecError: C JSON: the key 'a' occurs twice in one JSON object (line 1); JSON keeps only the last one silently, so nngraft refuses it: remove one of them
    """
    model.__pydantic_validator__ = _DuplicateKeyGuard(model.__pydantic_validator__, f"{model.__name__} JSON", error)
    return model
