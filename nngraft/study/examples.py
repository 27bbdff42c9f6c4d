"""The two record types every study module shares: facts and test examples (and reading and
writing examples files).

A :class:`Fact` is one record of a dataset (e.g. a fictional movie with two actors). A
:class:`TestExample` is a fact rendered through a test template: the prompt, the text of each
named span in it (``{"first_actor": "Ada Lovelace", "movie_title": "..."}``, usable by specs as
``{"span": "first_actor"}``) and the answer whose first token is the target.

Example:
    >>> ex = TestExample(fact_id="f1", template="sentence_3",
    ...                  prompt="Ada Lovelace stars in The Engine alongside",
    ...                  spans={"first_actor": "Ada Lovelace", "movie_title": "The Engine"},
    ...                  answer="Alan Turing")
    >>> ex.key
    'f1/sentence_3'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Fact:
    """One dataset record: a stable id and its fields (``first_actor``, ``movie_title``, ...)."""

    id: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.fields}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Fact":
        row = dict(row)
        return cls(id=str(row.pop("id")), fields=row)


@dataclass(frozen=True)
class TestExample:
    """A prompt built from a fact and a test template, with its named spans and its answer."""

    __test__ = False  # not a pytest test class

    fact_id: str
    template: str
    prompt: str
    spans: dict[str, str]
    answer: str

    @property
    def key(self) -> str:
        """Unique within a dataset × template set: ``fact_id/template``."""
        return f"{self.fact_id}/{self.template}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

def _example_from_row(row: Any, where: str) -> TestExample:
    """One line of an examples file as a :class:`TestExample`; :class:`DataError` naming the line
    and the field for anything else (a missing field, ``null``, a list, a number as the prompt …)."""
    from .errors import DataError

    needs = "each line needs fact_id, template, prompt, spans, answer"
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a test example (a JSON {type(row).__name__}, not an object); {needs}")
    missing = [k for k in ("fact_id", "template", "prompt", "answer") if k not in row]
    if missing:
        raise DataError(f"{where}: not a test example (no {', '.join(missing)}); {needs}")
    for key in ("fact_id", "template"):
        value = row[key]
        if not (isinstance(value, str) and value) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise DataError(f"{where}: {key} should be a non-empty string, got {value!r}; {needs}")
    for key in ("prompt", "answer"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: {key} should be a non-empty string, got {row[key]!r}; {needs}")
    spans = row.get("spans") or {}
    if not isinstance(spans, dict) or not all(isinstance(v, str) and v for v in spans.values()):
        raise DataError(f"{where}: spans should be an object of span name → non-empty text (e.g. "
                        f"{{\"first_actor\": \"Ada Lovelace\"}}), got {spans!r}")
    return TestExample(fact_id=str(row["fact_id"]), template=str(row["template"]), prompt=row["prompt"],
                       spans=dict(spans), answer=row["answer"])


def load_examples_jsonl(path: str | Path) -> list[TestExample]:
    """Test examples from a JSONL file: one ``{"fact_id", "template", "prompt", "spans", "answer"}``
    object per line (what :meth:`TestExample.to_dict` writes)."""
    from .errors import DataError

    from ..util.io import loads_json, read_text

    path = Path(path)
    examples = []
    for number, line in enumerate(read_text(path, "examples file", DataError).splitlines(), 1):
        if not line.strip():
            continue
        row = loads_json(line, f"{path}:{number}", DataError)
        examples.append(_example_from_row(row, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path} holds no test examples")
    keys = [e.key for e in examples]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"{path}: example {dup!r} (fact_id/template) occurs twice")
    return examples


def save_examples_jsonl(examples: Sequence[TestExample], path: str | Path) -> Path:
    """Write test examples as JSONL (atomically)."""
    from ..util.io import atomic_write_text

    return atomic_write_text(Path(path), "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n"
                                                 for e in examples))


def examples_hash(examples: Sequence[TestExample]) -> str:
    """sha256 of the examples' canonical JSON (keys, prompts, spans, answers)."""
    blob = json.dumps([e.to_dict() for e in examples], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()
