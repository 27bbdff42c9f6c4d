"""The user-facing entry point: :class:`Grafter` runs specs on a recipient with a donor.

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

import inspect
import threading
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .arch import Adapter, adapter_for
from .donor import Donor, ModelDonor, as_donor
from .backends.local import apply_plan
from .partial import derived_donors
from .plan import GraftPlan, compile_plan, first_grafted_position, prefix_signature
from .result import GraftResult
from .schedule import Chunk, Row, default_call_cost, schedule_rows
from .spec import GraftSpec
from .tokens import PaddedBatch, SpanValue, TokenizedPrompt, pad_left, pad_token_id, tokenize_prompts

SpecLike = GraftSpec | str | Mapping[str, Any]


def as_spec(spec: SpecLike) -> GraftSpec:
    """A GraftSpec from a spec, a JSON file path, or a dict."""
    if isinstance(spec, GraftSpec):
        return spec
    if isinstance(spec, Mapping):
        from pydantic import ValidationError

        from .errors import SpecError
        from .spec import format_validation_error

        try:
            return GraftSpec.model_validate(spec)
        except ValidationError as error:
            raise SpecError(format_validation_error(error, "<dict>")) from None
    return GraftSpec.load(spec)


def _load_model(name_or_path: str, dtype: Any, device: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
    return model.to(device).eval() if device else model.eval()


@dataclass(frozen=True)
class SharedPrefix:
    """How one row shares a prefix pass: rows with equal ``key`` (prompt ids, prefix signature)
    share one; the row takes its first ``length`` positions from it (0: shares nothing); ``spec``
    is set when the shared prefix carries grafts (the row's spec, equal to its group's there)."""

    key: Any
    length: int
    spec: GraftSpec | None = None


@dataclass
class GenerationResult:
    """Greedy continuations under a graft: new token ids, their text, and each step's logits."""

    tokens: torch.Tensor  # (batch, new_tokens)
    texts: list[str]
    step_logits: list[torch.Tensor]  # one (batch, vocab) tensor per new token


class Grafter:
    """Run graft specs on a recipient ``P`` with weights from a donor ``F``.

    Args:
        recipient: the pretrained model P (a loaded ``transformers`` model, or a path / hub id).
        donor: the finetuned model F: a loaded model, a path / hub id, a safetensors file or
            folder, a ``{name: tensor}`` dict, or any :class:`~nngraft.donor.Donor`.
        tokenizer: P's tokenizer (loaded from ``recipient`` when it is a path / hub id).
        adapter: override the architecture adapter (default: from ``config.model_type``).
        donors: more donors by name, for specs whose rules say ``"donor": NAME`` (e.g. the
            paper's hybrid experiment: the task model everywhere, a hybrid at the last token).
        batch_size: rows per forward pass (at most).
        share_prefix: when several rows share a prompt (many specs on one prompt), compute each
            prompt's ungrafted prefix once and run only the grafted suffixes on its KV cache
            (:mod:`nngraft.schedule`; equal to the plain pass up to float rounding).
        call_cost: the scheduler's price of one forward pass, in token positions (default: an
            estimate from the model's size and device, :func:`nngraft.schedule.default_call_cost`;
            0 shares whenever any positions are saved).

    One Grafter may be used from several threads; traces are serialized with a lock.
    P's weights are never modified: donor parameters are swapped in only for the duration of
    each donor call.
    """

    def __init__(self, recipient: Any, donor: Any, tokenizer: Any = None, *, adapter: Adapter | None = None,
                 donors: Mapping[str, Any] | None = None, batch_size: int = 32, dtype: Any = None,
                 device: Any = None, share_prefix: bool = True, call_cost: float | None = None) -> None:
        import nnsight

        if isinstance(recipient, str):
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(recipient)
            recipient = _load_model(recipient, dtype, device)
        if tokenizer is None:
            raise ValueError("pass the recipient's tokenizer (Grafter(P, F, tokenizer))")
        self.model = recipient
        self.tokenizer = tokenizer
        self.adapter = adapter or adapter_for(recipient)
        self.donors: dict[str, Donor] = {}
        for name, value in {"default": donor, **dict(donors or {})}.items():
            if isinstance(value, str) and not Path(value).exists():
                value = _load_model(value, dtype, device)  # a hub id; a local folder is read lazily
            self.donors[name] = as_donor(value)
            if isinstance(self.donors[name], ModelDonor):
                self.donors[name].check_against(recipient)
        self.donor: Donor = self.donors["default"]
        self._partial: dict[str, Any] = {}  # parameter-level donors derived from these, by name
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        if call_cost is None:
            call_cost = default_call_cost(recipient, self.adapter.n_layers(recipient.config))
        self.call_cost = call_cost
        self.nn = nnsight.NNsight(recipient)
        self._lock = threading.Lock()
        params = inspect.signature(recipient.forward).parameters
        self._keep_last = "logits_to_keep" in params
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(cls, recipient: str, donor: str, **kwargs: Any) -> "Grafter":
        """``Grafter.from_pretrained("meta-llama/Llama-3.2-1B", "me/llama-movies-sft")``."""
        return cls(recipient, donor, **kwargs)

    @classmethod
    def remote(cls, recipient: Any, donor: Any, tokenizer: Any = None, **kwargs: Any) -> "Grafter":
        """Run on NDIF, where only P is hosted and the donor travels as tensors:
        ``Grafter.remote("meta-llama/Meta-Llama-3.1-8B", donor=LoraDonor("adapter/"))``.
        See :class:`nngraft.backends.ndif.RemoteGrafter` and docs/remote.md."""
        from .backends.ndif import RemoteGrafter

        return RemoteGrafter(recipient, donor, tokenizer, **kwargs)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- compiling ------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str] | str,
                 spans: Sequence[Mapping[str, SpanValue]] | None = None) -> list[TokenizedPrompt]:
        return tokenize_prompts(self.tokenizer, prompts, spans)

    def plan(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
             spans: Sequence[Mapping[str, SpanValue]] | None = None) -> GraftPlan:
        """Compile without running (to inspect with ``plan.summary()`` or check a spec fits)."""
        tokenized = self.tokenize(prompts, spans)
        return compile_plan(self._per_row(spec, len(tokenized)), self.adapter, self.model.config, tokenized)

    @staticmethod
    def _per_row(spec: SpecLike | Sequence[SpecLike], n: int) -> list[GraftSpec]:
        if isinstance(spec, (GraftSpec, str, Mapping)):
            return [as_spec(spec)] * n
        specs = [as_spec(s) for s in spec]
        if len(specs) != n:
            raise ValueError(f"got {len(specs)} specs for {n} prompts; give one spec, or one per prompt")
        return specs

    # -- running --------------------------------------------------------------------------------

    def run(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
            spans: Sequence[Mapping[str, SpanValue]] | None = None, *, all_logits: bool = False,
            batch_size: int | None = None) -> GraftResult:
        """Next-token logits of every prompt under ``spec`` (one spec, or one per prompt).

        Each prompt's ``spans`` dict gives the text of the spans the spec names."""
        tokenized = self.tokenize(prompts, spans)
        specs = self._per_row(spec, len(tokenized))
        return self.run_rows(specs, tokenized, all_logits=all_logits, batch_size=batch_size)

    def run_grid(self, specs: Sequence[SpecLike] | Mapping[str, SpecLike], prompts: Sequence[str],
                 spans: Sequence[Mapping[str, SpanValue]] | None = None, *,
                 batch_size: int | None = None, progress: Any = None) -> dict[str, GraftResult]:
        """Every spec on every prompt, packed into shared forward passes (rows of a batch carry
        different specs). Returns ``{spec name: GraftResult}`` in the order given.

        ``progress``: ``True`` for a rich progress bar, or a callable taking the number of rows
        just finished."""
        if isinstance(specs, Mapping):
            named = [(name, as_spec(s)) for name, s in specs.items()]
        else:
            named = [(s.name, s) for s in (as_spec(x) for x in specs)]
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ValueError(f"spec names must be unique in a grid; got {names}")
        tokenized = self.tokenize(prompts, spans)
        rows = [(spec, p) for _, spec in named for p in tokenized]
        result = self.run_rows([s for s, _ in rows], [p for _, p in rows], batch_size=batch_size,
                                progress=progress)
        n = len(tokenized)
        return {
            name: GraftResult(result.logits[i * n:(i + 1) * n], result.prompts[i * n:(i + 1) * n],
                              self.tokenizer, [name] * n)
            for i, name in enumerate(names)
        }

    def run_rows(self, specs: list[GraftSpec], prompts: list[TokenizedPrompt], *, all_logits: bool = False,
                  batch_size: int | None = None, progress: Any = None) -> GraftResult:
        size = batch_size or self.batch_size
        if progress is True:
            with _progress_bar(len(prompts)) as advance:
                return self.run_rows(specs, prompts, all_logits=all_logits, batch_size=size, progress=advance)
        last: list[torch.Tensor | None] = [None] * len(prompts)
        full: list[torch.Tensor | None] = [None] * len(prompts)
        prefixes = self._shareable_prefixes(specs, prompts, all_logits)
        if any(p.length for p in prefixes):
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
                logits = self._forward_on_prefix(plan, chunk_prompts, [prefixes[i] for i in chunk.indices])
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

    # -- sharing each prompt's ungrafted prefix (see nngraft.schedule) ---------------------------

    def _shareable_prefixes(self, specs: list[GraftSpec], prompts: list[TokenizedPrompt],
                            all_logits: bool) -> list[SharedPrefix]:
        """Per row, which prefix pass it may share and how many leading positions it takes from it.

        Rows of one prompt whose grafts before the last token are the same (FE+LT with different
        last-token parts, say) share a *grafted* prefix: everything but the last token, computed
        once with those grafts. Other rows of a prompt share its ungrafted prefix: the positions
        before their first graft, computed once by P. Always leaves the last token to run (for its
        logits). Nothing is shared for a prompt that occurs once, with ``all_logits``, or with
        ``share_prefix`` off."""
        counts = Counter(p.ids for p in prompts)
        if not self.share_prefix or all_logits or all(c == 1 for c in counts.values()):
            return [SharedPrefix((p.ids, ()), 0) for p in prompts]
        signatures = [prefix_signature(s, p) if counts[p.ids] > 1 else () for s, p in zip(specs, prompts)]
        groups = Counter((p.ids, sig) for p, sig in zip(prompts, signatures))
        out = []
        for spec, prompt, sig in zip(specs, prompts, signatures):
            n = len(prompt)
            if counts[prompt.ids] == 1:
                out.append(SharedPrefix((prompt.ids, ()), 0))
            elif sig and groups[(prompt.ids, sig)] > 1:
                out.append(SharedPrefix((prompt.ids, sig), n - 1, spec))
            else:
                first = first_grafted_position(spec, prompt)
                out.append(SharedPrefix((prompt.ids, ()), min(n - 1, n if first is None else first)))
        return out

    def _forward_on_prefix(self, plan: GraftPlan, prompts: list[TokenizedPrompt],
                           prefixes: list[SharedPrefix]) -> torch.Tensor | None:
        """Last-column logits of ``plan`` on ``prompts``: one prefix pass computes every distinct
        shared prefix of these rows (P's own, or with the grafts their rows share there) and keeps
        its KV cache, then every row runs its own suffix on that cache. ``None`` when the model's
        cache does not hold the whole prefix (sliding-window layers): run it plainly."""
        keys: dict[Any, tuple[TokenizedPrompt, int, GraftSpec]] = {}
        for prompt, share in zip(prompts, prefixes):
            if share.length:
                _, longest, spec = keys.get(share.key, (prompt, 0, share.spec or GraftSpec()))
                keys[share.key] = (prompt, max(longest, share.length), spec)
        where = {key: i for i, key in enumerate(keys)}
        heads = list(keys.values())
        head = pad_left([p.ids[:n] for p, n, _ in heads], self.pad_id, self.device)
        width = head.input_ids.shape[1]
        lengths = [n for _, n, _ in heads]
        head_plan = GraftPlan([], len(heads), width)
        if any(spec.rules for _, _, spec in heads):  # grafted prefixes: their cells before the cut
            full = compile_plan([spec for _, _, spec in heads], self.adapter, self.model.config,
                                [p for p, _, _ in heads])
            head_end = torch.tensor(lengths)
            head_plan = full.remap(lambda rows, t: t < head_end[rows], [len(p) for p, _, _ in heads], width,
                                   [width - n for n in lengths])
            head_plan.modules = [m for m in head_plan.modules if m.path != self.adapter.lm_head]
        _, cache = self.forward(head_plan, head, use_cache=True)
        if not _cache_holds(cache, width):
            return None
        cache.batch_select_indices(torch.tensor([where.get(s.key, 0) for s in prefixes], device=self.device))
        # Row r sees the first `taken[r]` positions of its prefix, which sits right-aligned.
        taken = torch.tensor([s.length for s in prefixes])
        column = torch.arange(width)
        starts = torch.tensor([width - keys[s.key][1] if s.length else width for s in prefixes])[:, None]
        seen = (column >= starts) & (column < starts + taken[:, None])
        tail = pad_left([p.ids[s.length:] for p, s in zip(prompts, prefixes)], self.pad_id, self.device)
        batch = PaddedBatch(tail.input_ids, torch.cat([seen.to(tail.attention_mask), tail.attention_mask], dim=1),
                            tail.position_ids + taken[:, None].to(self.device), tail.pad)
        # Each row's own cells from its cut on (those before it are in the shared prefix).
        lengths = [len(p) for p in prompts]
        mine = plan.remap(lambda rows, t: t >= taken[rows], lengths, tail.input_ids.shape[1],
                          [pad - s.length for pad, s in zip(tail.pad, prefixes)])
        grafted = torch.tensor([s.spec is not None for s in prefixes])
        dropped = plan.remap(lambda rows, t: (t < taken[rows]) & ~grafted[rows], lengths, 1, [0] * len(prompts))
        if dropped.modules:  # an ungrafted prefix must hold no cell
            raise AssertionError("internal error: a graft fell inside a shared ungrafted prefix")  # pragma: no cover
        logits, _ = self.forward(mine, batch, cache=cache)
        return logits

    def forward(self, plan: GraftPlan, batch: PaddedBatch, *, keep_all: bool = False,
                cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass of P with ``plan`` applied. Returns (logits, KV cache or None)."""
        kwargs: dict[str, Any] = dict(batch.model_inputs(), use_cache=use_cache or cache is not None)
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_last and not keep_all:
            kwargs["logits_to_keep"] = 1
            plan = plan.lm_head_on_last_column(self.adapter.lm_head)
        with torch.no_grad(), self._lock:
            if plan.is_empty:
                out = self.model(**kwargs)
            else:
                out = self._traced(plan, kwargs)
        if not kwargs["use_cache"]:
            return out.logits, None
        cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers 5 renamed it
        return out.logits, cache

    def _traced(self, plan: GraftPlan, kwargs: dict[str, Any]) -> Any:
        donors = derived_donors(plan, self.donors, self.model, self.adapter, self._partial)
        with self.nn.trace(**kwargs):
            apply_plan(self.nn, plan, donors)
            out = self.nn.output.save()
        return out

    @property
    def pad_id(self) -> int:
        """The id rows are left-padded with (:func:`nngraft.tokens.pad_token_id`)."""
        return pad_token_id(self.tokenizer)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, spec: SpecLike | Sequence[SpecLike], prompts: Sequence[str] | str,
                 spans: Sequence[Mapping[str, SpanValue]] | None = None, *,
                 max_new_tokens: int = 8) -> GenerationResult:
        """Greedy decoding under a graft, with a KV cache.

        Each new token is processed once, grafted where the spec's selectors name it in the grown
        sequence (``last`` names every new token; spans name only prompt tokens). Tokens already
        processed keep the keys and values they were computed with, as in the per-token method.
        """
        tokenized = self.tokenize(prompts, spans)
        specs = self._per_row(spec, len(tokenized))
        lengths = [len(p) for p in tokenized]
        batch = pad_left([p.ids for p in tokenized], self.pad_id, self.device)
        plan = compile_plan(specs, self.adapter, self.model.config, tokenized)
        logits, cache = self.forward(plan, batch, use_cache=True)
        steps, new = [logits[:, -1]], [logits[:, -1].argmax(-1)]
        mask, positions = batch.attention_mask, batch.position_ids
        for _ in range(max_new_tokens - 1):
            lengths = [n + 1 for n in lengths]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            step = PaddedBatch(new[-1][:, None], mask, positions, batch.pad)
            grown = compile_plan(specs, self.adapter, self.model.config, tokenized, lengths=lengths)
            logits, cache = self.forward(grown.last_columns(1), step, cache=cache)
            steps.append(logits[:, -1])
            new.append(logits[:, -1].argmax(-1))
        tokens = torch.stack(new, dim=1)
        texts = [self.tokenizer.decode(row) for row in tokens.tolist()]
        return GenerationResult(tokens.cpu(), texts, [s.cpu() for s in steps])


class _progress_bar:
    """A rich progress bar over rows (spec × prompt), with rows/s and time left."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("grafting"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=True)
        self.task = self.progress.add_task("grafting", total=total)

    def __enter__(self):
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()



def _cache_holds(cache: Any, width: int) -> bool:
    """Whether every layer of a KV cache holds all ``width`` positions (sliding-window layers may
    keep fewer, and then a shared prefix cannot be used)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[-2] != width:
            return False
    return True
