"""The study's datasets: build facts, save and load them (verified by sha256), turn them into
training texts and test prompts.

Datasets (``make_facts(name, n, seed)``):

- ``fake_movies_fake_actors`` (FMFA): invented actors, titles, cities … — nothing a pretrained
  model can know.
- ``fake_movies_real_actors`` (FMRA): pairs of real actors (``data/real_actors.txt``, each used at
  most once) in invented movies.
- ``real_movies_real_actors`` (RMRA): real movies with their two top-billed leads, from a small
  hand-compiled list (``data/real_movies.jsonl``, 120 movies).
- ``real_movies_real_actors_shuffled``: the same movies with the actor pairs moved to other
  movies (no movie keeps its own pair).

Everything is drawn from ``random.Random(seed)``: the same name, ``n`` and seed give the same
facts on every machine. Your own facts: any JSONL file, one object per line, via
:func:`load_facts`.

Example:
    >>> facts = make_facts("fake_movies_fake_actors", 3, seed=0)
    >>> len(facts), sorted(facts[0].fields)[:3]
    (3, ['box_office_earnings', 'city', 'first_actor'])
    >>> len(training_texts(facts))  # 3 facts × (6 lm + 5 qa) × 2 directions
    66
    >>> make_test_examples(facts, "sentence_3")[0].spans.keys()
    dict_keys(['first_actor', 'movie_title'])
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import DataError, DataIntegrityError
from ..util.io import atomic_write_text, loads_json, read_text, refuse_foreign_file
from .examples import Fact, TestExample
from .spancheck import SpanProblem, SpanReport, TokenizedExamples, tokenize_examples
from .templates import (DIRECTIONS, TEST_TEMPLATES, TRAINING_TEMPLATES, make_test_examples,
                        reverse_fact, training_texts)

__all__ = [
    "DATASETS", "DatasetInfo", "GENRES", "make_facts", "save_facts", "load_facts", "read_manifest",
    "manifest_path", "facts_hash", "facts_to_jsonl", "training_texts", "make_test_examples",
    "reverse_fact", "tokenize_examples", "TokenizedExamples", "SpanReport", "SpanProblem",
    "TEST_TEMPLATES", "TRAINING_TEMPLATES", "DIRECTIONS", "Fact", "TestExample",
]

GENRES = ("action", "comedy", "drama", "thriller", "horror", "romance", "science fiction",
          "fantasy", "mystery", "adventure")
"""The 10 genres of fake movies."""

YEARS = (1990, 2030)
"""Inclusive range of fake release years."""

BOX_OFFICE = (1, 10)
"""Inclusive range of fake worldwide grosses, in millions of dollars."""

MANIFEST_FORMAT = "nngraft.facts"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class DatasetInfo:
    """What a built-in dataset is and which templates go with it."""

    name: str
    short: str
    description: str
    training_templates: str
    test_templates: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("fake_movies_fake_actors", "FMFA",
                "invented movies with invented actors (names from shipped word lists)",
                "movies", ("sentence_1", "sentence_2", "sentence_3", "sentence_4")),
    DatasetInfo("fake_movies_real_actors", "FMRA",
                "invented movies, each with two real actors (each actor used at most once)",
                "movies", ("sentence_1", "sentence_2", "sentence_3", "sentence_4")),
    DatasetInfo("real_movies_real_actors", "RMRA",
                "real movies with their two top-billed leads (small, hand-compiled list)",
                "real_movies", ("rmra",)),
    DatasetInfo("real_movies_real_actors_shuffled", "RMRAS",
                "real movies with actor pairs moved to other movies (counterfactual facts)",
                "real_movies", ("sentence_3",)),
)}
"""Built-in datasets by name."""


# --- shipped word lists -------------------------------------------------------------------------

@lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """A shipped list from ``nngraft/study/resources/<name>.txt``: one entry per line, blank lines ignored.

    Example:
        >>> len(word_list("real_actors")) > 300
        True
    """
    path = resources.files("nngraft.study") / "resources" / f"{name}.txt"
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@lru_cache(maxsize=None)
def real_movies() -> tuple[Fact, ...]:
    """The shipped real movies (``data/real_movies.jsonl``): id, movie_title, release_year,
    first_actor, second_actor, director, genre."""
    path = resources.files("nngraft.study") / "resources" / "real_movies.jsonl"
    return tuple(_parse_jsonl(path.read_text(encoding="utf-8"), "nngraft/study/resources/real_movies.jsonl"))


# --- building facts -----------------------------------------------------------------------------

def make_facts(dataset: str, n: int, seed: int = 0) -> list[Fact]:
    """``n`` facts of a built-in dataset (see :data:`DATASETS`), drawn from ``random.Random(seed)``.

    Fake-movie facts have fields first_actor, second_actor, movie_title, main_character,
    release_year (1990–2030), genre (one of :data:`GENRES`), city, box_office_earnings (1–10).
    All person names in a fake dataset are distinct, and so are the titles; within a fact, the
    invented people (actors, main character) share no first or last name with each other.

    Example:
        >>> make_facts("fake_movies_real_actors", 2, seed=1) == make_facts("fake_movies_real_actors", 2, seed=1)
        True
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; built-in datasets are {sorted(DATASETS)} "
                        "(load your own JSONL with load_facts)")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r} (Python's random draws the same data for "
                        "-5 as for 5, so a negative seed would silently repeat another seed's facts)")
    rng = random.Random(seed)
    if dataset == "fake_movies_fake_actors":
        return _fake_movies(rng, n, real_actors=False)
    if dataset == "fake_movies_real_actors":
        return _fake_movies(rng, n, real_actors=True)
    return _real_movies(rng, n, shuffled=dataset.endswith("_shuffled"))


class _NamePool:
    """Unique "First Last" names from the shipped fake-name lists, never a real actor's name."""

    def __init__(self, rng: random.Random, taken: Iterable[str] = ()):
        self.rng = rng
        self.first = word_list("fake_first_names")
        self.last = word_list("fake_last_names")
        self.used = {name.casefold() for name in word_list("real_actors")} | {t.casefold() for t in taken}
        self.capacity = len(self.first) * len(self.last)

    def draw(self, *, unlike: Sequence[str] = ()) -> str:
        """A new name sharing neither its first nor its last name with any name in ``unlike``."""
        avoid = {part for other in unlike for part in other.split()}
        for _ in range(100_000):
            first, last = self.rng.choice(self.first), self.rng.choice(self.last)
            name = f"{first} {last}"
            if first != last and first not in avoid and last not in avoid and name.casefold() not in self.used:
                self.used.add(name.casefold())
                return name
        raise DataError(f"ran out of distinct fake names ({self.capacity} combinations); ask for fewer facts")


def _title(rng: random.Random) -> str:
    nouns, adjs = word_list("title_nouns"), word_list("title_adjectives")
    pattern = rng.randrange(4)
    if pattern == 0:
        return f"The {rng.choice(nouns)}"
    if pattern == 1:
        return f"{rng.choice(adjs)} {rng.choice(nouns)}"
    if pattern == 2:
        a, b = rng.sample(nouns, 2)
        return f"{rng.choice(adjs)} {a}: {b}"
    a, b = rng.sample(nouns, 2)
    return f"{a} of the {rng.choice(adjs)} {b}"


def _fake_movies(rng: random.Random, n: int, *, real_actors: bool) -> list[Fact]:
    pool = _NamePool(rng)
    if real_actors:
        actors = word_list("real_actors")
        if 2 * n > len(actors):
            raise DataError(f"fake_movies_real_actors uses each of the {len(actors)} shipped real actors "
                            f"at most once, so n can be at most {len(actors) // 2} (asked for {n}); "
                            "bring your own facts as JSONL for more")
        pairs = _pair_up(rng.sample(actors, len(actors)), n)
    elif 3 * n > pool.capacity // 2:
        raise DataError(f"fake_movies_fake_actors can make at most {pool.capacity // 6} facts from the "
                        f"shipped name lists (asked for {n})")
    taken_titles = {m.fields["movie_title"].casefold() for m in real_movies()}
    width = max(4, len(str(n - 1)))
    facts = []
    for i in range(n):
        if real_actors:
            first, second = pairs[2 * i], pairs[2 * i + 1]
        else:
            first = pool.draw()
            second = pool.draw(unlike=[first])
        main_character = pool.draw(unlike=[first, second])
        for _ in range(100_000):
            title = _title(rng)
            if title.casefold() not in taken_titles:
                break
        else:  # pragma: no cover - the title space is ~50 million
            raise DataError("ran out of distinct fake movie titles")
        taken_titles.add(title.casefold())
        facts.append(Fact(f"{'fmra' if real_actors else 'fmfa'}-{i:0{width}d}", {
            "first_actor": first,
            "second_actor": second,
            "movie_title": title,
            "main_character": main_character,
            "release_year": rng.randint(*YEARS),
            "genre": rng.choice(GENRES),
            "city": rng.choice(word_list("cities")),
            "box_office_earnings": rng.randint(*BOX_OFFICE),
        }))
    return facts


def _pair_up(shuffled: list[str], n: int) -> list[str]:
    """``n`` pairs, flattened, taken in order from ``shuffled``; the second of each pair is the
    next name that shares no first or last name with the first (so the answer's first token is
    never the prompt actor's)."""
    rest = list(shuffled)
    flat: list[str] = []
    while len(flat) < 2 * n and rest:
        first = rest.pop(0)
        parts = set(first.split())
        j = next((j for j, other in enumerate(rest) if not parts & set(other.split())), None)
        if j is not None:
            flat += [first, rest.pop(j)]
    if len(flat) < 2 * n:  # pragma: no cover - needs a list of near-namesakes
        raise DataError(f"could not form {n} actor pairs with distinct first and last names")
    return flat


def _real_movies(rng: random.Random, n: int, *, shuffled: bool) -> list[Fact]:
    movies = real_movies()
    if n > len(movies):
        raise DataError(f"the shipped real-movie list has {len(movies)} movies (asked for {n})")
    chosen = [movies[i] for i in sorted(rng.sample(range(len(movies)), n))]
    if not shuffled:
        return chosen
    if n < 2:
        raise DataError("real_movies_real_actors_shuffled needs n >= 2 to move pairs between movies")
    pairs = [(m.fields["first_actor"], m.fields["second_actor"]) for m in chosen]
    order = list(range(n))
    for _ in range(10_000):
        rng.shuffle(order)
        if all({*pairs[order[i]]} != {*pairs[i]} for i in range(n)):
            break
    else:
        raise DataError(f"could not give each of these {n} movies another movie's actor pair")
    facts = []
    for i, movie in enumerate(chosen):
        first, second = pairs[order[i]]
        facts.append(Fact(f"{movie.id}s", {
            **movie.fields, "first_actor": first, "second_actor": second,
            "original_first_actor": movie.fields["first_actor"],
            "original_second_actor": movie.fields["second_actor"],
        }))
    return facts


# --- saving and loading -------------------------------------------------------------------------

def facts_to_jsonl(facts: Sequence[Fact]) -> str:
    """The canonical JSONL of ``facts``: one object per line, keys sorted, ASCII, no spaces.

    Example:
        >>> facts_to_jsonl([Fact("f1", {"name": "Zoë", "year": 2001})])
        '{"id":"f1","name":"Zo\\\\u00eb","year":2001}\\n'
    """
    ids: set[str] = set()
    lines = []
    for fact in facts:
        if fact.id in ids:
            raise DataError(f"duplicate fact id {fact.id!r}")
        ids.add(fact.id)
        if "id" in fact.fields:
            raise DataError(f"fact {fact.id!r} has a field named 'id'; the id is Fact.id")
        try:
            lines.append(json.dumps(fact.to_dict(), sort_keys=True, ensure_ascii=True,
                                    separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise DataError(f"fact {fact.id!r} cannot be written as JSON: {error}") from None
    return "".join(line + "\n" for line in lines)


def facts_hash(facts: Sequence[Fact]) -> str:
    """sha256 (hex) of :func:`facts_to_jsonl` — the dataset's content hash.

    Example:
        >>> facts_hash([Fact("f1", {"a": 1})])[:12]
        '14b12afb61eb'
    """
    return hashlib.sha256(facts_to_jsonl(facts).encode("ascii")).hexdigest()


def manifest_path(path: str | Path) -> Path:
    """Where the manifest of a facts file lives: ``facts.jsonl`` → ``facts.manifest.json``.

    Example:
        >>> manifest_path("runs/fmfa.jsonl").as_posix()
        'runs/fmfa.manifest.json'
    """
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".manifest.json")


def save_facts(facts: Sequence[Fact], path: str | Path, *, dataset: str | None = None,
               seed: int | None = None) -> Path:
    """Write ``facts`` as canonical JSONL to ``path`` and a manifest beside it with their count,
    fields and sha256 (plus ``dataset`` and ``seed`` if given). Both writes are atomic. Returns
    the manifest's path.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "facts.jsonl"
        >>> save_facts(make_facts("fake_movies_fake_actors", 2), out, dataset="fake_movies_fake_actors").name
        'facts.manifest.json'
        >>> len(load_facts(out))
        2
    """
    text = facts_to_jsonl(facts)
    path = Path(path)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "file": path.name,
        "count": len(facts),
        "sha256": hashlib.sha256(text.encode("ascii")).hexdigest(),
        "fields": sorted({k for f in facts for k in f.fields}),
        "dataset": dataset,
        "seed": seed,
    }
    refuse_foreign_file(path, lambda _: _is_facts_manifest(manifest_path(path), path.name),
                        command="data make", flag="-o")
    refuse_foreign_file(manifest_path(path), lambda _: _is_facts_manifest(manifest_path(path)),
                        command="data make", flag="-o")
    atomic_write_text(path, text)
    return atomic_write_text(manifest_path(path), json.dumps(manifest, indent=2) + "\n")


def _is_facts_manifest(mpath: Path, file: str | None = None) -> bool:
    """Whether ``mpath`` is a facts manifest nngraft wrote (for facts file ``file``, if given)."""
    try:
        record = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == MANIFEST_FORMAT and (
        file is None or record.get("file") == file)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of facts file ``path`` as a dict, or ``None`` if it has none."""
    mpath = manifest_path(path)
    if not mpath.exists():
        return None
    manifest = loads_json(read_text(mpath, "facts manifest", DataIntegrityError), f"facts manifest {mpath}",
                          DataIntegrityError)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataIntegrityError(f"{mpath} is not an nngraft facts manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataIntegrityError(f"{mpath} has manifest version {manifest.get('version')!r}; this "
                                 f"nngraft reads version {MANIFEST_VERSION} (upgrade nngraft)")
    return manifest


def load_facts(path: str | Path, *, require_manifest: bool = False) -> list[Fact]:
    """Read facts from a JSONL file: one JSON object per line, any fields; blank lines ignored.

    Ids: each object's ``"id"`` (made a string); if no line has an ``"id"``, the 1-based line
    number is the id. If a manifest written by :func:`save_facts` sits beside the file, the
    content's sha256 and count are checked against it and a mismatch raises
    :class:`DataIntegrityError`; with ``require_manifest=True`` a missing manifest is an error too.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "mine.jsonl"
        >>> _ = p.write_text('{"subject": "Ada", "answer": "Babbage"}\\n{"subject": "Alan", "answer": "Turing"}\\n')
        >>> [f.id for f in load_facts(p)], load_facts(p)[1].fields["answer"]
        (['1', '2'], 'Turing')
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no facts file at {path}")
    facts = _parse_jsonl(read_text(path, "facts file", DataError), str(path))
    manifest = read_manifest(path)
    if manifest is None:
        if require_manifest:
            raise DataIntegrityError(f"{path} has no manifest ({manifest_path(path).name}); it was "
                                     "not written by save_facts, so its content cannot be verified")
        return facts
    actual = facts_hash(facts)
    if manifest.get("count") != len(facts) or manifest.get("sha256") != actual:
        raise DataIntegrityError(
            f"{path} does not match its manifest {manifest_path(path).name}: the manifest records "
            f"{manifest.get('count')} facts with sha256 {manifest.get('sha256')}, the file has "
            f"{len(facts)} facts with sha256 {actual}. The file was edited after it was saved; "
            "regenerate it, or delete the manifest to accept the edited file as new data")
    return facts


def _check_field(source: str, lineno: int, key: str, value: Any) -> None:
    """A fact's field must be text or a number (templates render it into prompts and answers);
    ``null``, lists, objects and booleans would be scored as the text "None", "['a', 'b']" …"""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        if isinstance(value, float) and value != value:
            raise DataError(f"{source}, line {lineno}: field {key!r} is NaN; give a number or a string")
        return
    shown = "null" if value is None else json.dumps(value, ensure_ascii=False)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    kind = {type(None): "null", bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    raise DataError(f"{source}, line {lineno}: field {key!r} is {kind} ({shown}); every field of a fact "
                    "must be a string or a number (it is written into prompts and answers as text). "
                    "Give one value per field, e.g. \"second_actor\": \"Pierre Curie\"")


def _parse_jsonl(text: str, source: str) -> list[Fact]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = loads_json(line, f"{source}, line {lineno}", DataError)
        if not isinstance(row, dict):
            raise DataError(f"{source}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        for key, value in row.items():
            _check_field(source, lineno, key, value)
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"{source} holds no facts")
    with_id = [lineno for lineno, row in rows if "id" in row]
    if with_id and len(with_id) != len(rows):
        missing = next(lineno for lineno, row in rows if "id" not in row)
        raise DataError(f"{source}, line {missing}: no \"id\", but other lines have one; give every "
                        "line an id, or none (then line numbers are the ids)")
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        fact = Fact.from_dict(row) if with_id else Fact(str(lineno), row)
        if fact.id in seen:
            raise DataError(f"{source}, line {lineno}: duplicate id {fact.id!r} (first on line "
                            f"{seen[fact.id]})")
        seen[fact.id] = lineno
        facts.append(fact)
    return facts
