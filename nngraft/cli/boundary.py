"""The command line's error boundary: which exceptions are the user's to fix, and what to say.

A user error (a bad file or value, a model that cannot be loaded, a full disk, a folder we may not
write) ends ``nngraft`` with exit code 2 and one message saying what is wrong and what to do. Any
other exception is a bug in nngraft and shows its traceback. ``nngraft --debug …`` shows the
traceback of user errors too.

Example:
    >>> import errno
    >>> user_error_message(OSError(errno.ENOSPC, "No space left on device", "runs/x/results.jsonl"))[:46]
    'no space left on device (writing runs/x/result'
    >>> user_error_message(ZeroDivisionError("a bug")) is None
    True
"""

from __future__ import annotations

import errno

from ..errors import GraftError

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)

KEPT = ("Results already written are intact (each batch is appended whole and the manifest is "
        "replaced atomically); rerun the same command to resume.")


def user_error_message(error: BaseException) -> str | None:
    """The message to show for a user error, or ``None`` if ``error`` is a bug (show its
    traceback)."""
    if isinstance(error, GraftError):
        return str(error)
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        if error.errno in _NO_SPACE:
            writing = f" (writing{where})" if where else ""
            return (f"no space left on device{writing}: free some space, or give an output directory on "
                    f"another disk. {KEPT}")
        if error.errno in _DENIED:
            return (f"permission denied:{where or ' a file or folder'} ({error.strerror}); give a path you may "
                    "read (input) or write (output), or fix its permissions")
        if error.errno in _MISSING:
            return f"{error.strerror or 'no such file or directory'}:{where}; check the path"
        if error.errno is not None:
            return f"{error.strerror or error}:{where}"
        return " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, UnicodeError):
        return (f"text that is not valid UTF-8 ({error}); nngraft reads and writes UTF-8: convert the file, "
                "e.g. `iconv -f latin1 -t UTF-8 FILE > NEW`")
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return ("out of memory; use a smaller --batch-size (or \"batch_size\" in the sweep config), a smaller "
                f"dtype, or a machine with more memory. {KEPT}")
    return None

