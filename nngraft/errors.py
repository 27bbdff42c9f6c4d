"""Exceptions raised by nngraft.

Every error names the thing that is wrong (the rule, field, module or span) and, where there is
one, what to do about it. They all derive from :class:`GraftError`, so ``except GraftError``
catches anything nngraft raises on purpose.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error nngraft raises on purpose.

    Example:
        >>> from nngraft import GraftError, resolve_layers
        >>> try:
        ...     resolve_layers("last:3", 2)
        ... except GraftError as error:
        ...     print(type(error).__name__)
        LayerRangeError
    """


class SpecError(GraftError, ValueError):
    """A graft spec is malformed, or does not fit the model it is applied to.

    Example:
        >>> from nngraft import GraftSpec
        >>> GraftSpec.from_json('{"rules": [{"components": ["mlp"], "layers": "fifth_quarter"}]}')
        Traceback (most recent call last):
        ...
        nngraft.errors.SpecError: invalid graft spec <string>:
          rules[0].layers: Value error, unknown layer group 'fifth_quarter'; use 'all', ...
          rules[0].positions: Field required
    """


class UnsupportedArchitectureError(GraftError, KeyError):
    """No adapter is registered for a model's ``model_type``.

    Example:
        >>> from nngraft.arch import adapter_for_model_type
        >>> adapter_for_model_type("my_arch")
        Traceback (most recent call last):
        ...
        nngraft.errors.UnsupportedArchitectureError: no nngraft adapter for model_type 'my_arch' (known: ...
    """

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ComponentNotFoundError(SpecError):
    """A spec names a component this architecture does not have (e.g. ``gate`` on GPT-2).

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["pos_embed"], positions=[Last()])])
        >>> Grafter(*tiny_pair("llama")).plan(spec, ["Ada Lovelace stars in"])
        Traceback (most recent call last):
        ...
        nngraft.errors.ComponentNotFoundError: spec 'unnamed' rules[0]: component 'pos_embed' does not
        exist in 'llama' models (they have: embed, ...). It uses rotary position embeddings, which have no weights.
    """


class LayerRangeError(SpecError):
    """A layer selection is out of range for the model's depth, or selects no layer.

    Example:
        >>> from nngraft import resolve_layers
        >>> resolve_layers([12], 12)
        Traceback (most recent call last):
        ...
        nngraft.errors.LayerRangeError: layer 12 is out of range for a model with 12 layers (valid: 0 … 11, or -12 … -1)
    """


class PositionError(GraftError, ValueError):
    """A position selector cannot be resolved for a prompt (missing span, index out of range).

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Span
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor")])])
        >>> Grafter(*tiny_pair("llama")).plan(spec, ["Ada Lovelace stars in"])  # no spans=
        Traceback (most recent call last):
        ...
        nngraft.errors.PositionError: prompt 0: the spec grafts at span 'first_actor', but no text was given
        for it (spans given: none); pass spans=[{'first_actor': '...'}, ...]
    """


class SpanNotFoundError(PositionError):
    """A named span's text does not occur in the prompt.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Span
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor")])])
        >>> Grafter(*tiny_pair("llama")).plan(spec, ["Ada Lovelace stars in"], spans=[{"first_actor": "Grace"}])
        Traceback (most recent call last):
        ...
        nngraft.errors.SpanNotFoundError: prompt 0: span 'first_actor' = 'Grace' does not occur in the
        prompt 'Ada Lovelace stars in'
    """


class ArgumentError(GraftError, ValueError):
    """A public function got an argument of the wrong type or out of range (the message names the
    function, the argument and the value received).

    Example:
        >>> from nngraft import Grafter
        >>> from nngraft.testing import tiny_pair
        >>> Grafter(*tiny_pair("llama")).run({"rules": []}, ["Ada Lovelace stars in"], batch_size=0)
        Traceback (most recent call last):
        ...
        nngraft.errors.ArgumentError: Grafter.run: batch_size: Input should be an integer >= 1 or None, got 0 (int)
    """


class PromptError(GraftError, ValueError):
    """A prompt does not fit the model: a token id beyond its vocabulary, or more tokens than its
    context holds.

    Example:
        >>> from nngraft import Grafter
        >>> from nngraft.testing import tiny_pair
        >>> Grafter(*tiny_pair("llama")).run({"rules": []}, ["Ada " * 200])  # a context of 128 tokens
        Traceback (most recent call last):
        ...
        nngraft.errors.PromptError: prompt 0 has 202 tokens, more than the model's context of 128
        (max_position_embeddings); shorten it
    """


class ModelLoadError(GraftError, RuntimeError):
    """A model, tokenizer or config cannot be found or loaded: no such folder, a folder that holds
    no model, or a hub id that is not in the local cache (nngraft never downloads at run time).
    The message says what to give, install or fix."""


class DonorMismatchError(GraftError, ValueError):
    """The donor's weights do not fit the recipient (architecture, shape, or a missing tensor).

    Example:
        >>> from nngraft import Grafter
        >>> from nngraft.testing import tiny_pair
        >>> P, _, tok = tiny_pair("llama")
        >>> Grafter(P, tiny_pair("llama", n_layers=3)[1], tok)
        Traceback (most recent call last):
        ...
        nngraft.errors.DonorMismatchError: the donor (LlamaForCausalLM) computes differently from the
        recipient: the recipient has depth num_hidden_layers=2 but the donor has num_hidden_layers=3; ...
    """


class IdentityCheckError(GraftError):
    """A Grafter's identity guard failed: the empty spec does not reproduce P, or grafting everything
    does not reproduce F (the message says which config entries, buffers or module settings differ).
    The command line exits with code 1, as for a failed baseline check."""


class SchemaVersionError(SpecError):
    """A spec was written by a newer nngraft than the one reading it."""


class OutputExistsError(GraftError):
    """An output path holds a file or folder that the writing command did not write; nngraft
    never overwrites it."""


# -- remote grafting (nngraft.backends.ndif, nngraft.donors.delta, nngraft.backends.payload) -------------------------


class TraceError(GraftError, ValueError):
    """A compiled graft applied inside an nnsight trace the wrong way (outside a trace, after the
    trace touched a module, on another model).

    Example:
        >>> import nnsight, nngraft
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> compiled = Grafter(P, F, tok).compile(spec, ["Ada Lovelace stars in"])
        >>> nngraft.graft(nnsight.NNsight(P), compiled)  # outside any trace
        Traceback (most recent call last):
        ...
        nngraft.errors.TraceError: nngraft.graft(model, compiled) must be called inside an open trace of
        the model (with model.trace(**compiled.inputs): ...)
    """


class RemoteGraftError(GraftError):
    """A remote run could not be prepared, sent, or completed."""


class RemoteDonorError(DonorMismatchError):
    """A donor that cannot travel to a remote server (an nnsight envoy, an unsupported adapter)."""


class RemoteAuthError(RemoteGraftError):
    """No NDIF API key, or NDIF refused it."""


class RemoteConnectionError(RemoteGraftError):
    """NDIF could not be reached."""


class ModelNotAvailableError(RemoteGraftError):
    """The recipient model is not running on NDIF."""


class PayloadTooLargeError(RemoteGraftError):
    """A request would exceed the payload limit."""


class ForeignModuleError(RemoteGraftError):
    """A request references a module (or envoy) that is not the recipient's own.

    On NDIF such a reference resolves *by module path* to the hosted model's own module, so a
    graft from it would silently do nothing; a raw module would be shipped whole."""


class ServerEnvironmentError(RemoteGraftError):
    """A request contains an object the server cannot load (its package is not installed there)."""


class RemoteExecutionError(RemoteGraftError):
    """The server ran the request and it failed (the server's traceback is in the message)."""


class UnsupportedModuleError(RemoteGraftError):
    """A grafted module has no functional form nngraft can compute remotely."""


class RemoteUnsupportedError(RemoteGraftError, NotImplementedError):
    """A feature that works locally but not remotely (e.g. generation with a KV cache)."""


class RemoteDonorMismatch(RemoteGraftError, DonorMismatchError):
    """A donor made for another model than the remote recipient (e.g. a LoRA trained on another base)."""


class ClientVersionError(RemoteGraftError):
    """This machine's nnsight or Python is older than NDIF accepts (NDIF answers such a client
    with HTTP 400), or the server runs an nnsight this nngraft does not support."""


class GatedModelError(RemoteAuthError):
    """A gated Hugging Face repository (Meta's Llama, Google's Gemma): its config and tokenizer are
    downloaded on this machine, which needs a Hugging Face token with access (``HF_TOKEN``)."""


class RemoteTimeoutError(RemoteExecutionError):
    """NDIF stopped a request at its execution timeout."""


def __getattr__(name: str) -> object:
    """Names that moved out of this module (the study's dataset errors), for one release."""
    if name.startswith("__"):  # the import system's probes (__path__ …): not a moved name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .deprecated import moved_name

    return moved_name(__name__, name)
