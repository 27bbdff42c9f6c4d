"""The user-facing entry point: :class:`Grafter` runs specs on a recipient with a donor.

The pipeline: specs (:mod:`nngraft.spec`) → tokenized prompts (:mod:`nngraft.compile.tokens`) → a
compiled plan per pass (:mod:`nngraft.compile.plan`), rows packed into passes and prompt prefixes shared
(:mod:`nngraft.compile.schedule`) → the backend runs each pass (:mod:`nngraft.backends`: here, or on
NDIF) → :class:`~nngraft.result.GraftResult`.

Example:
    >>> from nngraft import Grafter, GraftSpec, GraftRule, Span, Last
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> g = Grafter(P, F, tok)
    >>> spec = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"],
    ...                  positions=[Span(span="first_actor"), Last()])])
    >>> out = g.run(spec, ["Ada Lovelace stars in a movie alongside"],
    ...             spans=[{"first_actor": "Ada Lovelace"}])
    >>> out.logits.shape[0], out.target_prob("Alan").shape
    (1, torch.Size([1]))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .arch import Adapter
from .errors import ArgumentError, GraftError, PromptError
from .backends.base import Backend
from .backends.local import LocalBackend
from .backends.setup import Setup
from .compile.plan import GraftPlan, compile_plan
from .result import GenerationResult, GraftResult, GridResult
from .compile.schedule import Chunk, Row, default_call_cost, forward_on_prefix, schedule_rows, shareable_prefixes
from .spec import GraftSpec, SpecLike, as_spec
from .spec.schema import per_row, spec_first
from .compile.tokens import PaddedBatch, SpanValue, TokenizedPrompt, pad_left, pad_token_id, tokenize_prompts
from .compile.trace import CompiledGraft
from .util.progress import row_progress


class Grafter:
    """Run graft specs on a recipient ``P`` with weights from a donor ``F``.

    Args:
        recipient: the pretrained model P (a loaded ``transformers`` model, or a path / hub id).
        donor: the finetuned model F: a loaded model, a path / hub id, a safetensors file or
            folder, a ``{name: tensor}`` dict, or any :class:`~nngraft.donors.donor.Donor`.
        tokenizer: P's tokenizer (loaded from ``recipient`` when it is a path / hub id).
        backend: where passes run: a :class:`~nngraft.backends.base.Backend` (default
            :class:`~nngraft.backends.local.LocalBackend`, this process; :meth:`remote` for NDIF).
        adapter: override the architecture adapter (default: from ``config.model_type``).
        donors: more donors by name, for specs whose rules say ``"donor": NAME`` (e.g. the
            paper's hybrid experiment: the task model everywhere, a hybrid at the last token).
        batch_size: rows per forward pass (at most; default: the backend's).
        share_prefix: when several rows share a prompt (many specs on one prompt), compute each
            prompt's ungrafted prefix once and run only the grafted suffixes on its KV cache
            (:mod:`nngraft.compile.schedule`; equal to the plain pass up to float rounding). Only on a
            backend that keeps a KV cache.
        call_cost: the scheduler's price of one forward pass, in token positions (default: an
            estimate from the model's size and device, :func:`nngraft.compile.schedule.default_call_cost`;
            0 shares whenever any positions are saved).
        check_identities: the identity guard (:mod:`nngraft.backends.identity`): on the first run,
            one extra pass checks that the empty spec gives P and grafting everything gives F (F a
            loaded model), and raises :class:`~nngraft.errors.IdentityCheckError` naming what differs
            if not. Local backend only; ``NNGRAFT_IDENTITY_CHECK=0`` also switches it off.

    One Grafter may be used from several threads; traces are serialized with a lock.
    P's weights are never modified.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # P, F, P's tokenizer
        >>> spec = GraftSpec(name="lt", rules=[GraftRule(components=["all"], positions=[Last()])])
        >>> g.run(spec, ["Ada Lovelace stars in", "Grace Hopper stars in"]).target_prob("Alan").shape
        torch.Size([2])
    """

    def __init__(self, recipient: Any, donor: Any, tokenizer: Any = None, *, backend: Backend | None = None,
                 adapter: Adapter | None = None, donors: Mapping[str, Any] | None = None,
                 batch_size: int | None = None, dtype: Any = None, device: Any = None, share_prefix: bool = True,
                 call_cost: float | None = None, check_identities: bool = True) -> None:
        from .util import checks

        where = "Grafter"
        if isinstance(recipient, Path):
            recipient = str(recipient)
        if not isinstance(recipient, (str, torch.nn.Module)):
            raise checks.fail(where, "recipient", "a loaded transformers model, or a local path / hub id", recipient)
        checks.positive_int(where, "batch_size", batch_size, optional=True)
        checks.flag(where, "share_prefix", share_prefix)
        checks.flag(where, "check_identities", check_identities)
        self.check_identities = check_identities
        self._identities_checked = False
        checks.number(where, "call_cost", call_cost, optional=True)
        if donors is not None and not isinstance(donors, Mapping):
            raise checks.fail(where, "donors", "a dict of donor name → donor, or None", donors)
        for key in donors or {}:
            if not isinstance(key, str) or not key or key == "default":
                raise checks.fail(where, "donors key", "a donor name such as 'hybrid' ('default' is the main "
                                  "donor)", key)
        self.backend = backend if backend is not None else LocalBackend()
        self.setup = Setup.build(recipient, donor, tokenizer, placement=self.backend.placement(recipient),
                                 adapter=adapter, donors=donors, dtype=dtype, device=device)
        self.backend.prepare(self.setup)
        self.model = self.setup.model
        self.tokenizer = self.setup.tokenizer
        self.adapter = self.setup.adapter
        self.batch_size = batch_size or self.backend.default_batch_size
        self.share_prefix = share_prefix and self.backend.supports_cache
        if call_cost is None:
            call_cost = default_call_cost(self.model, self.adapter.n_layers(self.model.config))
        self.call_cost = call_cost

    @classmethod
    def from_pretrained(cls, recipient: str, donor: str, **kwargs: Any) -> "Grafter":
        """``Grafter.from_pretrained("meta-llama/Llama-3.2-1B", "me/llama-movies-sft")``."""
        return cls(recipient, donor, **kwargs)

    @classmethod
    def remote(cls, recipient: Any, donor: Any, tokenizer: Any = None, *, adapter: Adapter | None = None,
               donors: Mapping[str, Any] | None = None, batch_size: int | None = None,
               check_identities: bool = True, **options: Any) -> "Grafter":
        """A Grafter whose passes run on NDIF, where only P is hosted and the donor travels as
        tensors: ``Grafter.remote("meta-llama/Meta-Llama-3.1-8B", donor=LoraDonor("adapter/"))``.
        ``options`` go to :class:`~nngraft.backends.ndif.NdifBackend` (``execution=``,
        ``dtype=``, ``max_payload_mb=``, ``api_key=``, ``host=``, ``revision=``, ``check_model=``,
        ``verbose=``); see docs/remote.md. ``check_identities``: the identity guard, as for a
        local Grafter (on the first run: two more requests)."""
        from .backends.ndif import NdifBackend

        return cls(recipient, donor, tokenizer, backend=NdifBackend(**options), adapter=adapter, donors=donors,
                   batch_size=batch_size, check_identities=check_identities)

    def __repr__(self) -> str:
        return (f"Grafter({self.model.config.model_type!r}, donor={_describe(self.donor)!r}, "
                f"backend={self.backend.describe()})")

    @property
    def donors(self) -> dict[str, Any]:
        """The run's donors by name (``"default"`` is ``donor``)."""
        return self.setup.donors

    @property
    def donor(self) -> Any:
        return self.setup.donors["default"]

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model.config)

    @property
    def device(self) -> torch.device:
        return self.setup.device

    @property
    def pad_id(self) -> int:
        """The id rows are left-padded with (:func:`nngraft.compile.tokens.pad_token_id`)."""
        return pad_token_id(self.tokenizer)

    # -- compiling ------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str] | str, spans: Sequence[Mapping[str, SpanValue]] | None = None,
                 *, where: str = "Grafter.tokenize", extra_tokens: int = 0) -> list[TokenizedPrompt]:
        """Tokenize prompts and locate their spans; refuse token ids beyond the model's vocabulary
        and prompts (plus ``extra_tokens`` to generate) longer than its context."""
        tokenized = tokenize_prompts(self.tokenizer, prompts, spans, where=where)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        context = getattr(self.model.config, "max_position_embeddings", None)
        for i, prompt in enumerate(tokenized):
            if max(prompt.ids) >= vocab or min(prompt.ids) < 0:
                bad = max(prompt.ids) if max(prompt.ids) >= vocab else min(prompt.ids)
                raise PromptError(f"prompt {i}: token id {bad} is outside the model's vocabulary of {vocab} "
                                  f"tokens ({prompt.text[:60]!r}); is the tokenizer the recipient's own?")
            if isinstance(context, int) and len(prompt) + extra_tokens > context:
                more = f" + {extra_tokens} new tokens" if extra_tokens else ""
                raise PromptError(f"prompt {i} has {len(prompt)} tokens{more}, more than the model's context of "
                                  f"{context} (max_position_embeddings); shorten it")
        return tokenized

    def plan(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
             spans: Sequence[Mapping[str, SpanValue]] | None = None) -> GraftPlan:
        """Compile without running (to inspect with ``plan.summary()`` or check a spec fits)."""
        spec, prompts = spec_first("plan", spec, prompts)
        tokenized = self.tokenize(prompts, spans, where="Grafter.plan")
        return compile_plan(per_row(spec, len(tokenized)), self.adapter, self.model.config, tokenized)

    # -- inside nnsight traces (nngraft.compile.trace) ----------------------------------------------------

    @property
    def model_envoy(self) -> Any:
        """P's nnsight envoy: read and edit P's modules through it inside :meth:`trace`
        (``g.model_envoy.model.layers[3].output``), as in any nnsight trace."""
        return self.setup.envoy

    def compile(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
                spans: Sequence[Mapping[str, SpanValue]] | None = None) -> CompiledGraft:
        """Compile ``spec`` (one, or one per prompt) for ``prompts`` into a graft to apply inside
        your own trace with :func:`nngraft.graft` (open it with ``model.trace(**compiled.inputs)``).
        Every module the spec names is grafted at its own output (MLP projections one by one), so
        every activation you read is the grafted one."""
        spec, prompts = spec_first("compile", spec, prompts)
        tokenized = self.tokenize(prompts, spans)
        specs = per_row(spec, len(tokenized))
        plan = compile_plan(specs, self.adapter, self.model.config, tokenized, collapse_mlp=False)
        batch = pad_left([p.ids for p in tokenized], self.pad_id, self.device)
        return self.backend.compile_graft(self.setup, plan, batch, tokenized, [s.name for s in specs])

    def trace(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
              spans: Sequence[Mapping[str, SpanValue]] | None = None, **kwargs: Any) -> Any:
        """An nnsight trace of P on ``prompts`` with ``spec`` grafted (one spec, or one per prompt);
        the arguments in :meth:`run`'s order. (The former order, ``trace(prompts, spec)``, still
        works for one release, with a :class:`DeprecationWarning`.)

        Inside, read and edit any module through :attr:`model_envoy` and ``.save()`` what you
        need, as in any nnsight trace; the graft runs first at every module (see
        :mod:`nngraft.compile.trace` for the order rule). ``kwargs`` go to the model's forward.

        Example:
            >>> from nngraft import Grafter, GraftSpec, GraftRule, Last
            >>> from nngraft.testing import tiny_pair
            >>> g = Grafter(*tiny_pair("llama"))
            >>> lm = g.model_envoy
            >>> spec = GraftSpec(rules=[GraftRule(components=["all"], positions=[Last()])])
            >>> with g.trace(spec, ["Ada Lovelace stars in"]):
            ...     hidden = lm.model.layers[1].output.save()
            ...     logits = lm.lm_head.output.save()
            >>> bool(torch.allclose(logits[0, -1], g.run(spec, ["Ada Lovelace stars in"]).logits[0], atol=1e-5))
            True
        """
        spec, prompts = spec_first("trace", spec, prompts, old_order=True)
        return self.open_trace(self.compile(spec, prompts, spans), **kwargs)

    def open_trace(self, compiled: CompiledGraft, **kwargs: Any) -> Any:
        """The nnsight trace of P running ``compiled`` first (what :meth:`trace` returns)."""
        return self.backend.open_trace(self.setup, compiled, **kwargs)

    # -- running --------------------------------------------------------------------------------

    def run(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
            spans: Sequence[Mapping[str, SpanValue]] | None = None, *, all_logits: bool = False,
            batch_size: int | None = None) -> GraftResult:
        """Next-token logits of every prompt under ``spec`` (one spec, or one per prompt).

        Each prompt's ``spans`` dict gives the text of the spans the spec names."""
        from .util import checks

        spec, prompts = spec_first("run", spec, prompts)
        checks.flag("Grafter.run", "all_logits", all_logits)
        checks.positive_int("Grafter.run", "batch_size", batch_size, optional=True)
        tokenized = self.tokenize(prompts, spans, where="Grafter.run")
        specs = per_row(spec, len(tokenized))
        return self.run_rows(specs, tokenized, all_logits=all_logits, batch_size=batch_size)

    def run_grid(self, specs: Sequence[SpecLike] | Mapping[str, SpecLike], prompts: Sequence[str],
                 spans: Sequence[Mapping[str, SpanValue]] | None = None, *,
                 batch_size: int | None = None, progress: Any = None) -> GridResult:
        """Every spec on every prompt, packed into shared forward passes (rows of a batch carry
        different specs). Returns ``{spec name: GraftResult}`` in the order given (a dict; a
        :class:`~nngraft.result.GridResult`, which Jupyter shows as a table).

        ``progress``: ``True`` for a rich progress bar, or a callable taking the number of rows
        just finished."""
        from .util import checks

        specs, prompts = spec_first("run_grid", specs, prompts)
        checks.positive_int("Grafter.run_grid", "batch_size", batch_size, optional=True)
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise checks.fail("Grafter.run_grid", "progress", "True, False, None or a callable", progress)
        if isinstance(specs, (GraftSpec, str, Path)) or not isinstance(specs, (Sequence, Mapping)):
            raise checks.fail("Grafter.run_grid", "specs", "a list of specs or a dict of name → spec", specs)
        if isinstance(specs, Mapping):
            named = [(name, as_spec(s)) for name, s in specs.items()]
        else:
            named = [(s.name, s) for s in (as_spec(x) for x in specs)]
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ArgumentError(f"Grafter.run_grid: specs: spec names must be unique in a grid; got {names}")
        tokenized = self.tokenize(prompts, spans, where="Grafter.run_grid")
        rows = [(spec, p) for _, spec in named for p in tokenized]
        result = self.run_rows([s for s, _ in rows], [p for _, p in rows], batch_size=batch_size,
                               progress=progress)
        n = len(tokenized)
        return GridResult({
            name: GraftResult(result.logits[i * n:(i + 1) * n], result.prompts[i * n:(i + 1) * n],
                              self.tokenizer, [name] * n)
            for i, name in enumerate(names)
        })

    def run_rows(self, specs: list[GraftSpec], prompts: list[TokenizedPrompt], *, all_logits: bool = False,
                 batch_size: int | None = None, progress: Any = None) -> GraftResult:
        """Rows of (spec, tokenized prompt), scheduled into passes (:mod:`nngraft.compile.schedule`):
        the engine under :meth:`run` and :meth:`run_grid`, for callers that tokenize themselves."""
        size = batch_size or self.batch_size
        self._guard(specs, prompts)
        if progress is False:
            progress = None
        if progress is True:
            with row_progress(len(prompts)) as advance:
                return self.run_rows(specs, prompts, all_logits=all_logits, batch_size=size, progress=advance)
        last: list[torch.Tensor | None] = [None] * len(prompts)
        full: list[torch.Tensor | None] = [None] * len(prompts)
        prefixes = shareable_prefixes(specs, prompts) if self.share_prefix and not all_logits else None
        if prefixes and any(p.length for p in prefixes):
            chunks = schedule_rows([Row(i, p.key, len(prompts[i]), p.length) for i, p in enumerate(prefixes)],
                                   size, self.call_cost)
        else:  # nothing to share: fixed chunks of rows sorted by length (little padding)
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            chunks = [Chunk(order[k:k + size], False) for k in range(0, len(order), size)]
        for chunk in chunks:
            chunk_prompts = [prompts[i] for i in chunk.indices]
            plan = compile_plan([specs[i] for i in chunk.indices], self.adapter, self.model.config, chunk_prompts)
            logits, pad = None, ()
            if chunk.shared:
                logits = forward_on_prefix(self.forward, plan, chunk_prompts, [prefixes[i] for i in chunk.indices],
                                           adapter=self.adapter, config=self.model.config, device=self.device,
                                           pad_id=self.pad_id)
            if logits is None:
                batch = pad_left([p.ids for p in chunk_prompts], self.pad_id, self.device)
                logits, _ = self.forward(plan, batch, keep_all=all_logits)
                pad = batch.pad
            for j, i in enumerate(chunk.indices):
                last[i] = logits[j, -1]
                if all_logits:
                    full[i] = logits[j, pad[j]:]
            if progress is not None:
                progress(len(chunk.indices))
        return GraftResult(torch.stack(last), [p.text for p in prompts], self.tokenizer,
                           [s.name for s in specs], full if all_logits else None)

    def _guard(self, specs: Sequence[GraftSpec], prompts: Sequence[TokenizedPrompt]) -> None:
        """The identity guard (:mod:`nngraft.backends.identity`), once per Grafter, on the first
        run's first prompt: the empty spec must give P, "everything" F."""
        from .backends.identity import EVERYTHING, check_identities, enabled, finetuned_model

        if self._identities_checked or not prompts or not enabled(self.check_identities):
            return
        if isinstance(self.backend, LocalBackend):
            check_identities(self.forward, self.model, self.donor, self.adapter, specs, prompts, self.pad_id,
                             self.device)
        else:  # two more requests; "everything" only where it fits one
            with_f = finetuned_model(self.donor) is not None
            estimate = getattr(self.backend, "estimate", None)
            if with_f and callable(estimate):
                try:
                    estimate(EVERYTHING, self.setup).check()  # PayloadTooLargeError where it does not fit
                except GraftError:
                    with_f = False
            log = getattr(self.backend, "requests", [])
            sent = len(log)
            try:  # a request refused (key, server, size) is refused as the run's own would be
                check_identities(self.forward, self.model, self.donor, self.adapter, specs, prompts, self.pad_id,
                                 self.device, with_f=with_f, remote=True,
                                 travel_dtype=getattr(self.donor, "dtype", None) or self.setup.dtype)  # as it ships
            finally:
                for entry in log[sent:]:  # the request log tells the guard's requests from the run's
                    entry["purpose"] = "identity check"
        self._identities_checked = True

    def forward(self, plan: GraftPlan, batch: PaddedBatch, *, keep_all: bool = False,
                cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass of P with ``plan`` applied, on the backend. Returns (logits, KV cache
        or None)."""
        return self.backend(self.setup, plan, batch, keep_all=keep_all, cache=cache, use_cache=use_cache)

    # -- attribution ------------------------------------------------------------------------------

    def attribute(self, metric: Any, prompts: Sequence[str] | str,
                  spans: Sequence[Mapping[str, SpanValue]] | None = None, **options: Any) -> Any:
        """Score every unit (position group × component × layer) by the first-order effect on
        ``metric`` (logits ``(n_prompts, vocab)`` → scalar) of grafting it alone, from one forward
        and one backward pass of P: :func:`nngraft.attribution.attribute` (``components=``,
        ``groups=``, ``heads=``, ``neurons=``, ``steps=`` for integrated scores along P → F)."""
        from .attribution import attribute

        return attribute(self, metric, prompts, spans, **options)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
                 spans: Sequence[Mapping[str, SpanValue]] | None = None, *,
                 max_new_tokens: int = 8, forced: Sequence[Sequence[int]] | None = None) -> GenerationResult:
        """Greedy decoding under a graft, with a KV cache (see :meth:`decode`).

        ``forced``: per prompt, token ids to feed instead of the greedy choice (teacher forcing:
        read ``step_logits`` to score a given continuation); decodes ``max(len(f) for f in
        forced)`` steps then, and ``max_new_tokens`` is ignored."""
        from .util import checks

        spec, prompts = spec_first("generate", spec, prompts)
        if forced is None:
            checks.positive_int("Grafter.generate", "max_new_tokens", max_new_tokens)
        elif not isinstance(forced, Sequence) or not forced or not all(
                isinstance(f, Sequence) and all(checks.is_int(t) for t in f) for f in forced):
            raise checks.fail("Grafter.generate", "forced", "a list of token id lists, one per prompt", forced)
        steps = max_new_tokens if forced is None else max(len(f) for f in forced)
        tokenized = self.tokenize(prompts, spans, where="Grafter.generate", extra_tokens=max(steps, 1) - 1)
        return self.decode(per_row(spec, len(tokenized)), tokenized, steps, forced=forced)

    def decode(self, specs: Sequence[GraftSpec], prompts: Sequence[TokenizedPrompt], steps: int, *,
               forced: Sequence[Sequence[int]] | None = None) -> GenerationResult:
        """The decode loop: one pass over the prompts, then ``steps - 1`` one-token passes on the
        KV cache, each token grafted where its row's spec names it in the grown sequence
        (``last`` names every new token; spans name only prompt tokens). Tokens already processed
        keep the keys and values they were computed with, as in the per-token method.

        Each step feeds the greedy choice, or with ``forced`` row ``i``'s ``forced[i][j]`` (the
        pad id once a row's forced tokens run out)."""
        specs, prompts = list(specs), list(prompts)
        if forced is not None and len(forced) != len(prompts):
            raise ArgumentError(f"forced: got {len(forced)} forced continuations for {len(prompts)} prompts")
        self._check_continuations(prompts, steps, forced)
        lengths = [len(p) for p in prompts]
        batch = pad_left([p.ids for p in prompts], self.pad_id, self.device)
        plan = compile_plan(specs, self.adapter, self.model.config, prompts)
        logits, cache = self.forward(plan, batch, use_cache=True)
        steps_logits: list[torch.Tensor] = []
        chosen: list[torch.Tensor] = []
        mask, positions = batch.attention_mask, batch.position_ids
        for j in range(max(steps, 1)):
            if j:
                lengths = [n + 1 for n in lengths]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                step = PaddedBatch(chosen[-1][:, None], mask, positions, batch.pad)
                grown = compile_plan(specs, self.adapter, self.model.config, prompts, lengths=lengths)
                logits, cache = self.forward(grown.last_columns(1), step, cache=cache)
            steps_logits.append(logits[:, -1])
            if forced is None:
                chosen.append(logits[:, -1].argmax(-1))
            else:
                chosen.append(torch.tensor([f[j] if j < len(f) else self.pad_id for f in forced],
                                           device=logits.device))
        tokens = torch.stack(chosen, dim=1)
        texts = [self.tokenizer.decode(row) for row in tokens.tolist()]
        return GenerationResult(tokens.cpu(), texts, [s.cpu() for s in steps_logits])


    def _check_continuations(self, prompts: Sequence[TokenizedPrompt], steps: int,
                             forced: Sequence[Sequence[int]] | None) -> None:
        """Refuse forced token ids the model cannot embed, an empty forced row, and a continuation
        that runs past the model's context (positions past ``max_position_embeddings`` compute
        numbers, not an error, on rotary models)."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        for i, row in enumerate(forced or []):
            if len(row) == 0:
                raise ArgumentError(f"forced[{i}]: Input should be a non-empty list of token ids (prompt {i} "
                                    "would be continued with padding)")
            for j, token in enumerate(row):
                if not 0 <= int(token) < vocab:
                    raise ArgumentError(f"forced[{i}][{j}]: token id {int(token)} is outside the model's "
                                        f"vocabulary of {vocab} tokens (ids 0 to {vocab - 1}); are the ids from the "
                                        "recipient's own tokenizer?")
        context = getattr(self.model.config, "max_position_embeddings", None)
        for i, prompt in enumerate(prompts):
            new = (len(forced[i]) if forced is not None else max(steps, 1)) - 1
            if isinstance(context, int) and len(prompt) + new > context:
                what = "forced" if forced is not None else "new"
                raise PromptError(f"prompt {i} has {len(prompt)} tokens + {new} {what} tokens after its first, "
                                  f"more than the model's context of {context} (max_position_embeddings); "
                                  "shorten the prompt or the continuation")


def _describe(donor: Any) -> str:
    describe = getattr(donor, "describe", None)
    return describe() if callable(describe) else type(donor).__name__


def __getattr__(name: str) -> Any:
    """``RemoteGrafter``, deprecated (:mod:`nngraft.deprecated` holds it)."""
    if name == "RemoteGrafter":
        from .deprecated import remote_grafter

        return remote_grafter()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
