"""Old import paths of nngraft's former flat layout, and old argument orders, kept working for one release.

nngraft's modules moved into packages (``nngraft.plan`` is now :mod:`nngraft.compile.plan`,
``nngraft.donor`` is :mod:`nngraft.donors.donor`, ``nngraft.tiny`` is :mod:`nngraft.testing`, …:
:data:`MOVED` lists them all). Importing an old path still works — it gives the very same module
object as the new path — and warns with a :class:`DeprecationWarning` naming the new path. The old
paths go away in the next release. :func:`warn_argument_order` is the warning of
``Grafter.trace``'s old argument order (prompts first). All deprecations of nngraft live in this one
module.

Example:
    >>> import warnings
    >>> import nngraft.compile.plan
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     import nngraft.plan as old
    >>> old is nngraft.compile.plan
    True
    >>> message("nngraft.plan")  # the warning the first import of an old path gives
    'nngraft.plan is deprecated and will be removed in the next release; import nngraft.compile.plan instead'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "nngraft.tokens": "nngraft.compile.tokens",
    "nngraft.plan": "nngraft.compile.plan",
    "nngraft.schedule": "nngraft.compile.schedule",
    "nngraft.trace": "nngraft.compile.trace",
    "nngraft.donor": "nngraft.donors.donor",
    "nngraft.delta": "nngraft.donors.delta",
    "nngraft.partial": "nngraft.donors.partial",
    "nngraft.loading": "nngraft.donors.loading",
    "nngraft.io": "nngraft.util.io",
    "nngraft.inputs": "nngraft.util.io",
    "nngraft.util.inputs": "nngraft.util.io",
    "nngraft.checks": "nngraft.util.checks",
    "nngraft.commands": "nngraft.cli.registry",
    "nngraft.boundary": "nngraft.cli.boundary",
    "nngraft.core_commands": "nngraft.cli.core",
    "nngraft.remote_commands": "nngraft.cli.remote",
    "nngraft.tiny": "nngraft.testing",
    "nngraft.study.models": "nngraft.study.provenance",
}
"""Old module path → the module it moved to."""


MOVED_NAMES: dict[tuple[str, str], str] = {
    ("nngraft.errors", "DataError"): "nngraft.study.errors",
    ("nngraft.errors", "TemplateError"): "nngraft.study.errors",
    ("nngraft.errors", "DataIntegrityError"): "nngraft.study.errors",
    ("nngraft.study.models", "CONVERSION_VERSION"): "nngraft.donors.loading",
    ("nngraft.study.models", "INSTALL_HINT"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "INSTALL_HINT"): "nngraft.study.smollm2",
    ("nngraft.study.models", "SMOLLM2_ALIASES"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "SMOLLM2_ALIASES"): "nngraft.study.smollm2",
    ("nngraft.study.models", "SMOLLM2_GGUF"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "SMOLLM2_GGUF"): "nngraft.study.smollm2",
    ("nngraft.study.models", "SMOLLM2_NAME"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "SMOLLM2_NAME"): "nngraft.study.smollm2",
    ("nngraft.study.models", "SMOLLM2_PACKAGE"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "SMOLLM2_PACKAGE"): "nngraft.study.smollm2",
    ("nngraft.study.models", "SMOLLM2_PIN"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "SMOLLM2_PIN"): "nngraft.study.smollm2",
    ("nngraft.study.models", "ModelLoadError"): "nngraft.donors.loading",
    ("nngraft.study.models", "resolve_device"): "nngraft.study.pairs",
    ("nngraft.study.models", "cache_dir"): "nngraft.donors.loading",
    ("nngraft.study.models", "default_permissions"): "nngraft.donors.loading",
    ("nngraft.study.models", "load_model"): "nngraft.donors.loading",
    ("nngraft.study.models", "quiet_transformers"): "nngraft.donors.loading",
    ("nngraft.study.models", "smollm2_gguf_path"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "smollm2_gguf_path"): "nngraft.study.smollm2",
    ("nngraft.study.models", "smollm2_path"): "nngraft.study.smollm2",
    ("nngraft.donors.loading", "smollm2_path"): "nngraft.study.smollm2",
    ("nngraft.study.templates", "read_training_templates"): "nngraft.study.template_files",
    ("nngraft.study.templates", "read_test_templates"): "nngraft.study.template_files",
}
"""(old module, name) → the module that defines the name now: names that moved out of a module
that still exists. The old module's ``__getattr__`` calls :func:`moved_name`."""


def moved_name(module: str, name: str) -> object:
    """``name`` from the module it moved to (imported by path, so the old module's layer does not
    depend on the new one's), with a :class:`DeprecationWarning`; :class:`AttributeError` for a
    name that never was there. ``module`` may also be the new path of an old module of
    :data:`MOVED` (``nngraft.study.models`` is ``nngraft.study.provenance`` now): the names that
    old module had moved elsewhere are found under its old name."""
    new = MOVED_NAMES.get((module, name))
    if new is None:  # a name an old path of this module (MOVED) used to have
        module, new = next(((old, MOVED_NAMES[old, name]) for old, target in MOVED.items()
                            if target == module and (old, name) in MOVED_NAMES), (module, None))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release; import it from {new}",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new), name)


_REMOTE_GRAFTER: type | None = None


def remote_grafter() -> type:
    """``nngraft.grafter.RemoteGrafter`` (deprecated): ``Grafter.remote(recipient, donor, tokenizer,
    **options)``, i.e. a Grafter with an :class:`~nngraft.backends.ndif.NdifBackend`. Built on first
    use, from modules imported by path (this module sits below them)."""
    global _REMOTE_GRAFTER
    if _REMOTE_GRAFTER is None:
        Grafter = importlib.import_module("nngraft.grafter").Grafter

        class RemoteGrafter(Grafter):
            """Deprecated: use ``Grafter.remote(recipient, donor, tokenizer, **options)`` (the same
            Grafter with an :class:`~nngraft.backends.ndif.NdifBackend`)."""

            def __init__(self, recipient, donor, tokenizer=None, *, adapter=None, donors=None,  # noqa: ANN001
                         batch_size=None, **options) -> None:  # noqa: ANN001
                NdifBackend = importlib.import_module("nngraft.backends.ndif").NdifBackend
                warnings.warn("RemoteGrafter is deprecated; use Grafter.remote(recipient, donor, tokenizer, ...)",
                              DeprecationWarning, stacklevel=2)
                super().__init__(recipient, donor, tokenizer, backend=NdifBackend(**options), adapter=adapter,
                                 donors=donors, batch_size=batch_size)

        RemoteGrafter.__module__ = "nngraft.grafter"
        _REMOTE_GRAFTER = RemoteGrafter
    return _REMOTE_GRAFTER


def message(old: str) -> str:
    return f"{old} is deprecated and will be removed in the next release; import {MOVED[old]} instead"


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path (the same object, not a copy)."""

    def __init__(self, new: str) -> None:
        self.new = new
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system has just set the old path's spec on the shared module: give its own back
        module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED` (and warns); every other name is left to Python."""

    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 - the MetaPathFinder signature
        new = MOVED.get(name)
        if new is None:
            return None
        # stacklevel: warn at the user's import statement, past the import system's frames
        warnings.warn(message(name), DeprecationWarning, stacklevel=_user_frame())
        return importlib.machinery.ModuleSpec(name, _Alias(new))


def _user_frame() -> int:
    """The ``stacklevel`` that makes the warning point at the user's import: counted as
    :func:`warnings.warn` counts, skipping the import system's frames (and ``importlib.import_module``)."""
    frame, level = sys._getframe(2), 1  # the caller of MovedModuleFinder.find_spec
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):  # warnings skips these without counting
            level += 1
            if not name.endswith(("importlib/__init__.py", "importlib\\__init__.py")):
                return level
        frame = frame.f_back
    return level


def warn_argument_order(method: str, stacklevel: int) -> None:
    """Warn that ``method`` was called in its old argument order, prompts first (it takes the
    spec first now, as every Grafter method does)."""
    warnings.warn(f"{method}(prompts, spec, ...) is deprecated and will stop working in the next release; every "
                  f"Grafter method takes the spec first: {method.split('.')[-1]}(spec, prompts, spans=...)",
                  DeprecationWarning, stacklevel=stacklevel)


def adapt_old_backend(cls: type) -> None:
    """Let a :class:`~nngraft.backends.base.Backend` subclass written on the contract before 0.2
    work for one release, with a :class:`DeprecationWarning` where the class is defined.

    That contract: ``attach(recipient, donor, tokenizer, *, adapter, donors, dtype, device)``
    loaded P, the tokenizer and the donors and set ``model``, ``tokenizer``, ``adapter`` and
    ``donors`` on the backend; ``forward(plan, batch, *, keep_all, cache, use_cache)`` ran one pass;
    ``compile_graft(plan, ...)`` and ``open_trace(compiled, ...)`` took no set-up. Now the Grafter
    builds the set-up and a backend only executes: ``backend(setup, plan, batch, ...)``. A class
    that defines ``attach`` and ``forward`` and no ``__call__`` gets: ``prepare(setup)`` calling its
    ``attach`` with what the set-up resolved (P, the main donor, the tokenizer, the adapter, the
    named donors, the donors' dtype; the device is P's), ``__call__`` calling its ``forward``, and
    its own ``compile_graft`` / ``open_trace`` called without the set-up."""
    own = vars(cls)
    if "__call__" in own or not (callable(own.get("attach")) and callable(own.get("forward"))):
        return
    warnings.warn(f"{cls.__qualname__} implements the Backend contract before 0.2 (attach(recipient, donor, tokenizer, "
                  "...) and forward(plan, batch, ...)), which is deprecated and will stop working in the next "
                  "release: the Grafter now loads P and the donors into a Setup, and a backend only executes "
                  "__call__(setup, plan, batch, *, keep_all, cache, use_cache) -> (logits, cache)",
                  DeprecationWarning, stacklevel=4)  # the class statement (past Backend.__init_subclass__, ABCMeta)

    def prepare(self, setup) -> None:  # noqa: ANN001
        donors = dict(setup.donors)
        donor = donors.pop("default", None)
        self.attach(setup.model, donor, setup.tokenizer, adapter=setup.adapter, donors=donors, dtype=setup.dtype,
                    device=None)

    def call(self, setup, plan, batch, *, keep_all: bool = False, cache=None, use_cache: bool = False):  # noqa: ANN001
        return self.forward(plan, batch, keep_all=keep_all, cache=cache, use_cache=use_cache)

    cls.prepare, cls.__call__ = prepare, call
    if "compile_graft" in own:
        old_compile = own["compile_graft"]
        cls.compile_graft = lambda self, setup, *args, **kwargs: old_compile(self, *args, **kwargs)
    if "open_trace" in own:
        old_open = own["open_trace"]
        cls.open_trace = lambda self, setup, *args, **kwargs: old_open(self, *args, **kwargs)


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once); :mod:`nngraft` calls this on import."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # before any finder that could see a stale old file
