"""The old module paths of the flat layout (nngraft.plan, nngraft.donor, nngraft.tiny, …) keep
working for one release, through nngraft.deprecated alone, with a DeprecationWarning naming the
new path; every public name of nngraft.__all__ still resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import nngraft
from nngraft.deprecated import MOVED, MOVED_NAMES


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module_and_warns_with_the_new_path(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is new
    assert module.__name__ == MOVED[old] and module.__spec__.name == MOVED[old]  # the module keeps its own name
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert messages == [f"{old} is deprecated and will be removed in the next release; import {MOVED[old]} instead"]


def test_the_warning_points_at_the_users_import_line():
    sys.modules.pop("nngraft.delta", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from nngraft.delta import DenseDonor  # noqa: F401
    assert [w.filename for w in caught if w.category is DeprecationWarning] == [__file__]


def test_from_package_import_of_an_old_module_and_its_names():
    sys.modules.pop("nngraft.plan", None)
    vars(nngraft).pop("plan", None)  # as in a fresh interpreter (an import sets the attribute)
    with pytest.warns(DeprecationWarning, match=r"nngraft\.plan is deprecated .* import nngraft\.compile\.plan"):
        from nngraft import plan
    from nngraft.compile.plan import compile_plan

    assert plan.compile_plan is compile_plan


def test_a_path_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("nngraft.planz")


def test_every_public_name_resolves():
    for name in nngraft.__all__:
        assert getattr(nngraft, name) is not None, name


def test_old_paths_work_in_a_fresh_interpreter():
    """Old code that never imported the new paths: attribute access through the old module works,
    including the CLI verbs' old registry (the same COMMANDS dict)."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import nngraft.tiny\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
            "warnings.simplefilter('ignore')\n"
            "import nngraft.tiny, nngraft.commands, nngraft.cli.registry\n"
            "assert nngraft.commands.COMMANDS is nngraft.cli.registry.COMMANDS\n"
            "print(nngraft.tiny.tiny_config('llama').model_type)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "warned nngraft.tiny is deprecated and will be removed in the next release; import nngraft.testing instead",
        "llama"]


@pytest.mark.parametrize("old", sorted(MOVED_NAMES))
def test_a_moved_name_is_the_new_object_and_warns_with_its_new_module(old):
    module, name = old
    new = getattr(importlib.import_module(MOVED_NAMES[old]), name)
    with warnings.catch_warnings():  # an old module path (nngraft.study.models) warns on its own import
        warnings.simplefilter("ignore", DeprecationWarning)
        old_module = importlib.import_module(module)
    with pytest.warns(DeprecationWarning) as caught:
        got = getattr(old_module, name)
    assert got is new
    assert [str(w.message) for w in caught] == [
        f"{module}.{name} is deprecated and will be removed in the next release; import it from {MOVED_NAMES[old]}"]


def test_a_name_an_old_module_path_had_moved_elsewhere_is_found_through_its_new_path():
    """nngraft.study.models is nngraft.study.provenance now; the names it had already given away
    (load_model to nngraft.donors.loading) still resolve, warn with the old path, and a name it never
    had is an AttributeError naming the module asked."""
    import nngraft.study.provenance as provenance
    from nngraft.donors.loading import load_model
    from nngraft.study.pairs import resolve_device

    with pytest.warns(DeprecationWarning, match=r"^nngraft\.study\.models\.load_model is deprecated .* from nngraft\.donors\.loading$"):
        assert provenance.load_model is load_model
    with pytest.warns(DeprecationWarning, match=r"nngraft\.study\.models\.resolve_device .* from nngraft\.study\.pairs"):
        assert provenance.resolve_device is resolve_device
    with pytest.raises(AttributeError, match="module 'nngraft.study.provenance' has no attribute 'no_such_name'"):
        provenance.no_such_name  # noqa: B018


def test_the_names_nngraft_study_models_defined_itself_are_still_there():
    """What old code imported from nngraft.study.models (its own names before it joined
    nngraft.study.provenance) is the same object through the old path."""
    from nngraft.donors.loading import weights_fingerprint
    from nngraft.study import pairs, provenance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("nngraft.study.models")
        got = {name: getattr(old, name) for name in ("weights_fingerprint", "model_identity", "hub_revision",
                                                      "environment_versions", "FINGERPRINT_VERSION", "PACKAGES",
                                                      "resolve_device")}
    assert got["weights_fingerprint"] is weights_fingerprint and got["resolve_device"] is pairs.resolve_device
    assert all(got[name] is getattr(provenance, name) for name in ("model_identity", "hub_revision",
                                                                    "environment_versions", "FINGERPRINT_VERSION",
                                                                    "PACKAGES"))


def test_from_import_of_a_moved_name_and_a_name_that_never_was():
    from nngraft.study.errors import DataError

    with pytest.warns(DeprecationWarning, match=r"nngraft\.errors\.DataError is deprecated .* nngraft\.study\.errors"):
        from nngraft.errors import DataError as old
    assert old is DataError and issubclass(DataError, nngraft.GraftError)
    with pytest.raises(ImportError, match="cannot import name 'NoSuchError'"):
        from nngraft.errors import NoSuchError  # noqa: F401
