"""nngraft.util.io: files are replaced whole or not at all — text and figures alike."""

from __future__ import annotations

import pytest

from nngraft.util.io import atomic_save_figure, atomic_write_text


def test_atomic_write_text_replaces_whole_file_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "sub" / "a.json", "old")
    assert path.read_text() == "old"
    atomic_write_text(path, "new")
    assert path.read_text() == "new"

    import os

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "half")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temp file left


def test_atomic_save_figure_keeps_the_old_image_when_saving_fails(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = atomic_save_figure(fig, tmp_path / "plot.png", dpi=50)
    svg = atomic_save_figure(fig, tmp_path / "plot.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in svg.read_bytes()[:400]
    before = png.read_bytes()

    class Interrupted(Exception):
        pass

    class Exploding:
        def savefig(self, target, **kwargs):
            with open(target, "wb") as handle:
                handle.write(b"\x89PNG half")  # a partial write, then the run is killed
            raise Interrupted

    with pytest.raises(Interrupted):
        atomic_save_figure(Exploding(), png)
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "plot.svg"]
    plt.close(fig)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """A temp file is created 0600; the renamed result must be what a plain open() would give."""
    import os
    import stat

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    previous = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "a.json", "{}")
        figure = atomic_save_figure(plt.figure(), tmp_path / "plot.png")
    finally:
        os.umask(previous)
    plt.close("all")
    assert stat.S_IMODE(text.stat().st_mode) == mode
    assert stat.S_IMODE(figure.stat().st_mode) == mode


def test_a_rewritten_file_keeps_its_mode(tmp_path):
    import os
    import stat

    path = tmp_path / "manifest.json"
    path.write_text("old")
    for mode in (0o640, 0o604, 0o755):
        os.chmod(path, mode)
        atomic_write_text(path, "new")
        assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == "new"
