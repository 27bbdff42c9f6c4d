"""Test-session settings. Tiny models spend their time in Python and thread hand-offs, not in
matrix multiplies, so one thread is faster and steadier on a small (and maybe busy) CPU. Set
NNGRAFT_TEST_THREADS to change it; subprocesses started by tests inherit the setting."""

import os

threads = os.environ.setdefault("NNGRAFT_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", threads)
os.environ.setdefault("MKL_NUM_THREADS", threads)

import torch  # noqa: E402

torch.set_num_threads(int(threads))
