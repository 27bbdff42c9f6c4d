"""The two record types every study module shares: facts and test examples.

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

from dataclasses import asdict, dataclass, field
from typing import Any


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
