"""nngraft.cli.boundary: which exceptions are the user's (one message, exit 2) and which are bugs
(a traceback), each kind with its own advice."""

from __future__ import annotations

import errno

import pytest

from nngraft.cli.boundary import KEPT, user_error_message
from nngraft.errors import ArgumentError, SpecError


@pytest.mark.parametrize("error, expected", [
    (ArgumentError("f: n: Input should be an integer >= 1, got 0"), "f: n: Input should be an integer >= 1, got 0"),
    (SpecError("invalid graft spec x.json"), "invalid graft spec x.json"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/results.jsonl"),
     "no space left on device (writing runs/x/results.jsonl): free some space, or give an output directory on "
     "another disk. " + KEPT),
    (OSError(errno.EACCES, "Permission denied", "/root/x"),
     "permission denied: /root/x (Permission denied); give a path you may read (input) or write (output), or fix "
     "its permissions"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"),
     "permission denied: /ro/x (Read-only file system); give a path you may read (input) or write (output), or fix "
     "its permissions"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "facts.jsonl"),
     "No such file or directory: facts.jsonl; check the path"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs"), "Is a directory: runs; check the path"),
    (OSError(errno.EIO, "Input/output error", "disk"), "Input/output error: disk"),
    (OSError("plain"), "plain"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     "text that is not valid UTF-8 ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte); nngraft "
     "reads and writes UTF-8: convert the file, e.g. `iconv -f latin1 -t UTF-8 FILE > NEW`"),
    (MemoryError(), "out of memory; use a smaller --batch-size (or \"batch_size\" in the sweep config), a smaller "
                    "dtype, or a machine with more memory. " + KEPT),
])
def test_a_user_error_gets_its_own_message(error, expected):
    assert user_error_message(error) == expected


def test_an_out_of_memory_error_from_torch_is_the_users():
    OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})  # torch.cuda.OutOfMemoryError, by name
    assert user_error_message(OutOfMemoryError("CUDA out of memory")).startswith("out of memory; use a smaller")


@pytest.mark.parametrize("bug", [ZeroDivisionError("x"), KeyError("k"), ValueError("v"), TypeError("t"),
                                 RuntimeError("r")])
def test_anything_else_is_a_bug_with_a_traceback(bug):
    assert user_error_message(bug) is None
