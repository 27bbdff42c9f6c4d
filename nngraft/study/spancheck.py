"""Tokenize test examples and account for every span: none is dropped without a count.

The paper's code silently skipped an example whenever it could not find the entity's tokens in
the prompt, so the number of examples differed between configs. Here every example is tokenized
with the core's :func:`nngraft.compile.tokens.tokenize_prompt` (spans located by character offsets) and
each problem is recorded:

- *unlocatable*: a span's text is not in the prompt, or no token covers it. An error by default;
  with ``skip_unlocatable=True`` those examples are dropped and counted in the report.
- *partial*: a token straddles the span's boundary (e.g. ``",Ada"`` as one token), so grafting
  at the span also touches neighbouring text. Kept, counted, and reported with one warning.

Example:
    >>> from nngraft.testing import tiny_tokenizer
    >>> from nngraft.study.examples import TestExample
    >>> ok = TestExample("f1", "t", "Ada Quenby stars in a movie alongside", {"first_actor": "Ada Quenby"}, "Leo")
    >>> bad = TestExample("f2", "t", "Someone stars in a movie alongside", {"first_actor": "Ada Quenby"}, "Leo")
    >>> result = tokenize_examples(tiny_tokenizer("gpt2"), [ok, bad], skip_unlocatable=True)
    >>> [e.key for e in result.examples], result.report.counts()
    (['f1/t'], {'total': 2, 'kept': 1, 'skipped': 1, 'unlocatable_spans': 1, 'partial_spans': 0})
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import SpanNotFoundError
from ..compile.tokens import SpanAlignmentWarning, TokenizedPrompt, tokenize_prompt
from .examples import TestExample


@dataclass(frozen=True)
class SpanProblem:
    """One span of one example that could not be located, or that cuts through a token."""

    key: str
    span: str
    message: str


@dataclass(frozen=True)
class SpanReport:
    """What happened to each example's spans on one tokenizer."""

    tokenizer: str
    total: int
    skipped: tuple[str, ...] = ()
    unlocatable: tuple[SpanProblem, ...] = ()
    partial: tuple[SpanProblem, ...] = ()

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Totals, for logs and result files."""
        return {"total": self.total, "kept": self.kept, "skipped": len(self.skipped),
                "unlocatable_spans": len(self.unlocatable), "partial_spans": len(self.partial)}

    def summary(self) -> str:
        """One line per kind of problem, with the spans involved and a first example."""
        lines = [f"{self.total} examples on tokenizer {self.tokenizer}: {self.kept} kept, "
                 f"{len(self.skipped)} skipped"]
        for label, problems in (("span not locatable", self.unlocatable),
                                ("span cuts through a token (kept)", self.partial)):
            if problems:
                by_span = Counter(p.span for p in problems)
                spans = ", ".join(f"{s} ×{c}" for s, c in sorted(by_span.items()))
                lines.append(f"  {label}: {len(problems)} ({spans}); e.g. {problems[0].key}: "
                             f"{problems[0].message}")
        return "\n".join(lines)


@dataclass(frozen=True)
class TokenizedExamples:
    """The kept examples, their tokenization (same order) and the report."""

    examples: list[TestExample]
    prompts: list[TokenizedPrompt]
    report: SpanReport = field(repr=False)


def tokenize_examples(tokenizer: Any, examples: Sequence[TestExample], *,
                      skip_unlocatable: bool = False) -> TokenizedExamples:
    """Tokenize each example's prompt and locate its spans; see the module docstring.

    Raises :class:`~nngraft.errors.SpanNotFoundError` listing every unlocatable span unless
    ``skip_unlocatable`` (then those examples are left out and counted in ``.report``). Errors
    that concern the tokenizer rather than an example (e.g. a slow tokenizer without character
    offsets) are raised as they are.
    """
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    kept: list[TestExample] = []
    prompts: list[TokenizedPrompt] = []
    skipped: list[str] = []
    unlocatable: list[SpanProblem] = []
    partial: list[SpanProblem] = []
    for i, ex in enumerate(examples):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpanAlignmentWarning)
            try:
                tokenized = tokenize_prompt(tokenizer, ex.prompt, ex.spans, index=i)
            except SpanNotFoundError:
                tokenized = None
        if tokenized is None:
            unlocatable.extend(_failing_spans(tokenizer, ex, i))
            skipped.append(ex.key)
            continue
        for w in caught:
            if issubclass(w.category, SpanAlignmentWarning):
                span = next((s for s in ex.spans if f"span {s!r}" in str(w.message)), "?")
                partial.append(SpanProblem(ex.key, span, str(w.message)))
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        kept.append(ex)
        prompts.append(tokenized)
    report = SpanReport(name, len(examples), tuple(skipped), tuple(unlocatable), tuple(partial))
    if unlocatable and not skip_unlocatable:
        shown = "\n".join(f"  {p.key}: {p.message}" for p in unlocatable[:5])
        more = f"\n  … and {len(unlocatable) - 5} more" if len(unlocatable) > 5 else ""
        raise SpanNotFoundError(
            f"{len(skipped)} of {len(examples)} examples have spans that cannot be located on "
            f"tokenizer {name}:\n{shown}{more}\n"
            "Pass skip_unlocatable=True to leave them out (they are counted in the report).")
    if partial:
        warnings.warn(report.summary(), SpanAlignmentWarning, stacklevel=2)
    return TokenizedExamples(kept, prompts, report)


def _failing_spans(tokenizer: Any, ex: TestExample, index: int) -> list[SpanProblem]:
    problems = []
    for span, text in ex.spans.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpanAlignmentWarning)
            try:
                tokenize_prompt(tokenizer, ex.prompt, {span: text}, index=index)
            except SpanNotFoundError as error:
                problems.append(SpanProblem(ex.key, span, str(error)))
    return problems
