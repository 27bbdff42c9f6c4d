"""nngraft.study.pairs: loading P and F for runs and sweeps, every kind of donor the CLI takes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nngraft.errors import DonorMismatchError
from nngraft.study.pairs import load_pair, model_from_safetensors
from nngraft.study.sweep_config import ModelPair
from tests.helpers.runs import save_tiny_pair


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_safetensors_file_loads_as_the_folder_it_came_from(tmp_path):
    """`--donor F/model.safetensors` (as Python's Grafter(P, "F/model.safetensors") takes it) gives the
    same F as `--donor F`; a bare file with no config beside it too."""
    P, F = save_tiny_pair(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "w.safetensors").write_bytes((F / "model.safetensors").read_bytes())
    folder = load_pair(ModelPair(name="m", recipient=str(P), donor=str(F)))
    for file in (F / "model.safetensors", bare / "w.safetensors"):
        loaded = load_pair(ModelPair(name="m", recipient=str(P), donor=str(file)))
        want, got = _state(folder.donor), _state(loaded.donor)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
        assert not any(torch.equal(got[k], v) for k, v in _state(folder.recipient).items() if k.endswith("q_proj.weight"))
        assert loaded.identity["donor"]["weights_fingerprint"] == folder.identity["donor"]["weights_fingerprint"]


def test_a_safetensors_file_that_is_not_a_copy_of_p_is_refused(tmp_path):
    P, F = save_tiny_pair(tmp_path)
    recipient = load_pair(ModelPair(name="m", recipient=str(P), donor=str(F))).recipient
    state = _state(recipient)
    key = next(k for k in state if k.endswith("q_proj.weight"))
    wrong = dict(state, **{key: torch.zeros(3, 3)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(DonorMismatchError, match=rf"has tensor '{key}' of shape \(3, 3\) but the recipient's"):
        model_from_safetensors(tmp_path / "wrong.safetensors", recipient)
    missing = {k: v for k, v in state.items() if k != key}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(DonorMismatchError, match=rf"has no tensor '{key}'"):
        model_from_safetensors(tmp_path / "missing.safetensors", recipient)
