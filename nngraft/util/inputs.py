"""Reading the user's files: text and JSON with one clear error for every way a file can be bad.

A missing file, a directory where a file is expected, a file we may not read, text that is not
UTF-8 (latin-1, UTF-16 …) and JSON objects that give one key twice (where plain JSON parsers keep
the last value silently) all raise the caller's error type (``SpecError``, ``DataError`` …)
with a message that names the file and says what to do.

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
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import GraftError, ModelLoadError

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
