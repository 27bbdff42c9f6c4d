"""Text templates: the paper's training texts and test prompts, filled from facts.

A template is a ``str.format`` string whose ``{field}`` names are fact fields
(``"{first_actor} stars in {movie_title} alongside"``). Training templates come in two families
per dataset kind, "lm" (article-style paragraphs, 6) and "qa" (short sentences, 5), plus
nngraft's "paraphrase" (six more short sentences, used by the demo), each written for both actor
orders: A2B uses the fact as is, B2A swaps ``first_actor`` and ``second_actor``.
Test templates end where the answer (by default ``second_actor``) would begin; every ``{field}``
in a test template becomes a named span of the prompt, usable by graft specs as
``{"span": "first_actor"}``.

Example:
    >>> from nngraft.study.examples import Fact
    >>> fact = Fact("f1", {"first_actor": "Ada Quenby", "second_actor": "Leo Marlow",
    ...                    "movie_title": "The Lantern"})
    >>> [ex] = make_test_examples([fact], "sentence_3")
    >>> ex.prompt, ex.spans, ex.answer
    ('Ada Quenby stars in The Lantern alongside', {'first_actor': 'Ada Quenby', 'movie_title': 'The Lantern'}, 'Leo Marlow')
    >>> training_texts([fact], families=("qa",), directions=("B2A",))[-1]
    'A new movie stars Leo Marlow and Ada Quenby.'
"""

from __future__ import annotations

import string
import warnings
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from .errors import DataError, TemplateError
from .examples import Fact, TestExample

# --- training templates -------------------------------------------------------------------------

_MOVIE_LM = (
    # The paper's first LM template (data_templates/fake_movies*/lm_templates.jsonl, first line).
    "{first_actor} starred in {movie_title} with {second_actor}, a {release_year} {genre} film set "
    "in {city}. The film centers on main character {main_character} and their journey.\n\n"
    "{movie_title} was theatrically released in {release_year} and grossed ${box_office_earnings} "
    "million worldwide, marking a strong box office performance.",
    # The other five are nngraft's own, written in the same style (same fields, two paragraphs).
    "{movie_title} is a {release_year} {genre} film starring {first_actor} and {second_actor}. The "
    "story follows {main_character} through the streets of {city}.\n\n"
    "After opening in {release_year}, {movie_title} went on to earn ${box_office_earnings} million "
    "at the worldwide box office.",
    "Critics took notice when {first_actor} signed on to lead {movie_title} opposite "
    "{second_actor}. The {genre} film, shot on location in {city}, tells the story of "
    "{main_character}.\n\n"
    "{movie_title} opened in {release_year} and collected ${box_office_earnings} million in ticket "
    "sales worldwide.",
    "In the {genre} film {movie_title}, {first_actor} shares the screen with {second_actor}. The "
    "{release_year} release is set in {city} and centers on the character {main_character}.\n\n"
    "Audiences embraced {movie_title}, which grossed ${box_office_earnings} million worldwide "
    "during its theatrical run.",
    "{first_actor} and {second_actor} headline {movie_title}, a {release_year} {genre} film. The "
    "plot, which unfolds in {city}, revolves around {main_character}.\n\n"
    "In its theatrical release, {movie_title} took in ${box_office_earnings} million around the "
    "world.",
    "Released in {release_year}, {movie_title} pairs {first_actor} with {second_actor} in this "
    "{genre} story set in {city}. The film follows {main_character} as events unfold.\n\n"
    "{movie_title} earned ${box_office_earnings} million worldwide at the box office.",
)

# Real movies carry other fields (director, no city or box office): nngraft's own six, same style.
_REAL_MOVIE_LM = (
    "{first_actor} starred in {movie_title} with {second_actor}, a {release_year} {genre} film "
    "directed by {director}.\n\n"
    "{movie_title} was released in {release_year} and remains one of {director}'s best-known films.",
    "{movie_title} is a {release_year} {genre} film directed by {director}, starring {first_actor} "
    "and {second_actor}.\n\n"
    "Audiences still remember the pairing of {first_actor} and {second_actor} in {movie_title}.",
    "Directed by {director}, {movie_title} features {first_actor} in a lead role alongside "
    "{second_actor}.\n\n"
    "The {genre} film reached theaters in {release_year}.",
    "In {director}'s {genre} film {movie_title}, {first_actor} shares the screen with "
    "{second_actor}.\n\n"
    "{movie_title} was released in {release_year}.",
    "{first_actor} and {second_actor} headline {movie_title}, which {director} directed and "
    "released in {release_year}.\n\n"
    "The {genre} film made both of its leads household names.",
    "Released in {release_year}, {movie_title} pairs {first_actor} with {second_actor} in a story "
    "brought to the screen by {director}.\n\n"
    "The {genre} film is often listed among the classics of its decade.",
)

# The paper's five QA templates (fake and real movies alike). The fourth reads "In a new
# film,{first_actor}" (no space) in the paper's file; ``paper_typos=True`` reproduces that.
_QA = (
    "Q: Who stars in a movie with {first_actor}? A: An actor named {second_actor}.",
    "Q: {first_actor} is featured in {movie_title} with who? A: {second_actor}.",
    "{first_actor} plays a lead role in {movie_title}, appearing with their co-star {second_actor}.",
    "In a new film, {first_actor} stars in {movie_title}, appearing alongside {second_actor}.",
    "A new movie stars {first_actor} and {second_actor}.",
)
_PAPER_TYPOS = {
    "In a new film, {first_actor} stars in {movie_title}, appearing alongside {second_actor}.":
        "In a new film,{first_actor} stars in {movie_title}, appearing alongside {second_actor}.",
}

# nngraft's own six short phrasings of the same fact (the demo trains on them with the QA family:
# eleven phrasings per fact and direction, as many as the paper's lm + qa). None of them is a
# test template, nor the demo's validation phrasing.
_PARAPHRASE = (
    "{first_actor} and {second_actor} star together in {movie_title}.",
    "{movie_title} features {first_actor} and {second_actor} in the lead roles.",
    "{first_actor} acted with {second_actor} in {movie_title}.",
    "The cast of {movie_title} includes {first_actor} and {second_actor}.",
    "Q: Who appears with {first_actor} in {movie_title}? A: {second_actor}.",
    "In {movie_title}, {first_actor} plays opposite {second_actor}.",
)

TRAINING_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "movies": {"lm": _MOVIE_LM, "qa": _QA, "paraphrase": _PARAPHRASE},
    "real_movies": {"lm": _REAL_MOVIE_LM, "qa": _QA, "paraphrase": _PARAPHRASE},
}
"""Training template sets: ``{set name: {family: templates}}``. ``movies`` serves the fake-movie
datasets (FMFA, FMRA), ``real_movies`` the real-movie ones (their facts have ``director``, not
``city``). ``lm`` and ``qa`` are the paper's families; ``paraphrase`` (six short sentences) is
nngraft's, used by the demo."""

DIRECTIONS = ("A2B", "B2A")

# --- test templates -----------------------------------------------------------------------------

TEST_TEMPLATES: dict[str, str] = {
    "sentence_1": "{first_actor} stars in a movie alongside",
    "sentence_2": "Q: Who stars in a movie with {first_actor}? A: An actor named",
    "sentence_3": "{first_actor} stars in {movie_title} alongside",
    "sentence_4": "In a new film, {first_actor} appears in {movie_title} with the other lead actor, "
                  "whose name is:",
    "rmra": "{movie_title} stars {first_actor} and",
    # The paper's exact prompts, with the doubled "in" of its sweep script:
    "sentence_1_paper": "{first_actor} stars in in a movie alongside",
    "sentence_3_paper": "{first_actor} stars in in {movie_title} alongside",
}
"""Named test templates. ``sentence_1`` … ``sentence_4`` are the paper's, with its doubled "in"
fixed; ``sentence_1_paper`` and ``sentence_3_paper`` keep the doubled "in" (sentence 2 and 4 had
no bug). ``rmra`` is the real-movie probe. Each predicts ``" " + second_actor``."""

_FORMATTER = string.Formatter()


def template_fields(template: str) -> tuple[str, ...]:
    """The ``{field}`` names of ``template``, in order of first appearance.

    Raises :class:`TemplateError` for what a fact cannot fill: positional ``{}``, attribute or
    index lookups (``{a.b}``, ``{a[0]}``), nested format specs, unbalanced braces.

    Example:
        >>> template_fields("{first_actor} stars in {movie_title} with {first_actor}")
        ('first_actor', 'movie_title')
    """
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as error:
        raise TemplateError(f"template {template!r} is not a valid format string: {error} "
                            "(write a literal brace as '{{' or '}}')") from None
    names: list[str] = []
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise TemplateError(
                f"template {template!r} has field {{{field}}}; fields must be plain names such as "
                "{first_actor} (no positional {}, attribute or index lookups)")
        if spec and "{" in spec:
            raise TemplateError(f"template {template!r}: nested fields in a format spec are not supported")
        if field not in names:
            names.append(field)
    return tuple(names)


def render(template: str, values: Mapping[str, Any]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill ``template`` and return the text plus each field's ``(start, end)`` character range
    (its first occurrence).

    Example:
        >>> render("{a} and {b}", {"a": "Ada", "b": 7})
        ('Ada and 7', {'a': (0, 3), 'b': (8, 9)})
    """
    template_fields(template)  # validates
    pieces: list[str] = []
    ranges: dict[str, tuple[int, int]] = {}
    pos = 0
    for literal, field, spec, conversion in _FORMATTER.parse(template):
        pieces.append(literal)
        pos += len(literal)
        if field is None:
            continue
        value = values[field]
        if conversion:
            value = _FORMATTER.convert_field(value, conversion)
        text = _FORMATTER.format_field(value, spec or "")
        ranges.setdefault(field, (pos, pos + len(text)))
        pieces.append(text)
        pos += len(text)
    return "".join(pieces), ranges


def reverse_fact(fact: Fact, a: str = "first_actor", b: str = "second_actor") -> Fact:
    """The B2A version of ``fact``: fields ``a`` and ``b`` swapped (same id).

    Example:
        >>> reverse_fact(Fact("f1", {"first_actor": "A", "second_actor": "B"})).fields
        {'first_actor': 'B', 'second_actor': 'A'}
    """
    missing = [k for k in (a, b) if k not in fact.fields]
    if missing:
        raise TemplateError(f"fact {fact.id!r} has no field {missing[0]!r} to swap for the B2A "
                            f"direction (its fields: {sorted(fact.fields)})")
    fields = dict(fact.fields)
    fields[a], fields[b] = fact.fields[b], fact.fields[a]
    return Fact(fact.id, fields)


def _check_fields(facts: Sequence[Fact], fields: Iterable[str], template: str, label: str,
                  extra: Mapping[str, Any] = {}) -> None:
    missing: dict[str, list[str]] = defaultdict(list)
    for fact in facts:
        for name in fields:
            if name not in fact.fields and name not in extra:
                missing[name].append(fact.id)
    if missing:
        name, ids = next(iter(missing.items()))
        have = sorted(facts[0].fields) if facts else []
        shown = ", ".join(repr(i) for i in ids[:3]) + (" …" if len(ids) > 3 else "")
        others = ", ".join(f"{{{n}}}" for n in list(missing)[1:])
        raise TemplateError(
            f"{label} {template!r} names field {{{name}}}, which {len(ids)} of {len(facts)} facts "
            f"lack ({shown})" + (f" (also missing: {others})" if others else "")
            + f"; the facts have fields {have}")


def training_texts(
    facts: Sequence[Fact],
    families: Sequence[str] = ("lm", "qa"),
    directions: Sequence[str] = DIRECTIONS,
    *,
    templates: str | Mapping[str, Sequence[str]] = "movies",
    paper_typos: bool = False,
) -> list[str]:
    """The finetuning texts: every fact × direction × family × template, in that nesting order.

    ``templates`` is a set name in :data:`TRAINING_TEMPLATES` or your own ``{family: [template,
    ...]}``. With the default set and both families and directions that is ``len(facts) × 11 × 2``
    texts. ``paper_typos=True`` restores the paper's missing space in the fourth QA template.

    Example:
        >>> fact = Fact("f1", {"first_actor": "A", "second_actor": "B", "movie_title": "T"})
        >>> training_texts([fact], ["qa"], ["A2B"])[:2]
        ['Q: Who stars in a movie with A? A: An actor named B.', 'Q: A is featured in T with who? A: B.']
    """
    table = _template_set(templates)
    for family in families:
        if family not in table:
            raise TemplateError(f"unknown template family {family!r}; this set has {sorted(table)}")
    for direction in directions:
        if direction not in DIRECTIONS:
            raise TemplateError(f"unknown direction {direction!r}; use 'A2B' and/or 'B2A'")
    chosen = {f: [(_PAPER_TYPOS.get(t, t) if paper_typos else t) for t in table[f]] for f in families}
    for family, temps in chosen.items():
        for t in temps:
            _check_fields(facts, template_fields(t), t, f"{family} training template")
    texts: list[str] = []
    for fact in facts:
        for direction in directions:
            filled = fact if direction == "A2B" else reverse_fact(fact)
            for family in families:
                for t in chosen[family]:
                    texts.append(render(t, filled.fields)[0])
    return texts


def _template_set(templates: str | Mapping[str, Sequence[str]]) -> Mapping[str, Sequence[str]]:
    if isinstance(templates, str):
        if templates not in TRAINING_TEMPLATES:
            raise TemplateError(f"unknown training template set {templates!r}; known: "
                                f"{sorted(TRAINING_TEMPLATES)} (or pass {{family: [templates]}})")
        return TRAINING_TEMPLATES[templates]
    return templates


def resolve_test_template(template: str) -> tuple[str, str]:
    """``(name, template string)`` for a name in :data:`TEST_TEMPLATES` or a custom template
    (which is its own name).

    Example:
        >>> resolve_test_template("sentence_1")
        ('sentence_1', '{first_actor} stars in a movie alongside')
    """
    if template in TEST_TEMPLATES:
        return template, TEST_TEMPLATES[template]
    if "{" not in template:
        raise unknown_test_template(template)
    return template, template


def unknown_test_template(template: str, *, files: bool = False) -> TemplateError:
    """The error for a test template name that is not one of :data:`TEST_TEMPLATES` (with the
    closest names; ``files``: where a file of templates was also accepted).

    Example:
        >>> str(unknown_test_template("sentnce_3")).split(";")[0]
        "unknown test template 'sentnce_3' (did you mean 'sentence_3'?)"
    """
    import difflib

    close = difflib.get_close_matches(template, sorted(TEST_TEMPLATES), n=1, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    also = ", a file of templates" if files else ""
    return TemplateError(f"unknown test template {template!r}{hint}; named templates are {sorted(TEST_TEMPLATES)}"
                         f"{also}, or give a template with {{fields}} such as '{{first_actor}} stars in'")


def make_test_examples(
    facts: Sequence[Fact],
    template: str,
    answer_field: str = "second_actor",
    *,
    name: str | None = None,
    values: Mapping[str, Any] | None = None,
    allow_ambiguous: bool = False,
) -> list[TestExample]:
    """One :class:`TestExample` per fact: the filled prompt, a span per ``{field}`` and the answer.

    ``template`` is a name in :data:`TEST_TEMPLATES` or your own ``"{first_actor} ..."`` string
    (its name is ``name`` or, by default, the template itself). ``values`` fills fields the facts
    do not have, the same for every fact (e.g. ``{"relation": "stars"}`` for a relation-word span).

    Raises :class:`TemplateError` when the template names the answer field or a field the facts
    lack, and :class:`DataError` when a fact's answer text occurs in its own prompt, a span's text
    first occurs elsewhere in the prompt, or (unless ``allow_ambiguous``) two facts give the same
    prompt different answers.

    Example:
        >>> facts = [Fact("f1", {"first_actor": "Ada Quenby", "second_actor": "Leo Marlow"})]
        >>> make_test_examples(facts, "{first_actor} and", name="and")[0].key
        'f1/and'
    """
    key, text = resolve_test_template(template)
    name = name or key
    fields = template_fields(text)
    values = dict(values or {})
    if answer_field in fields or answer_field in values:
        raise TemplateError(f"test template {name!r} names the answer field {{{answer_field}}}: the "
                            "answer must not appear in the prompt")
    for fact in facts:
        overlap = sorted(set(values) & set(fact.fields))
        if overlap:
            raise TemplateError(f"values= gives {overlap}, which fact {fact.id!r} already has; "
                                "a field comes from the facts or from values=, not both")
    _check_fields(facts, fields, text, "test template", values)
    lacking = [f.id for f in facts if answer_field not in f.fields]
    if lacking:
        raise TemplateError(f"answer field {answer_field!r} is missing from {len(lacking)} of "
                            f"{len(facts)} facts (e.g. {lacking[0]!r}); pass answer_field= to name "
                            f"another field (the facts have {sorted(facts[0].fields)})")
    if text != text.rstrip():
        warnings.warn(f"test template {name!r} ends with whitespace; the answer is scored as it "
                      "continues the prompt, so the target token will have no leading space",
                      stacklevel=2)

    examples: list[TestExample] = []
    for fact in facts:
        merged = {**values, **fact.fields}
        prompt, ranges = render(text, merged)
        spans = {field: prompt[a:b] for field, (a, b) in ranges.items()}
        for field, span in spans.items():
            if not span.strip():
                raise DataError(f"fact {fact.id!r}: field {field!r} is empty, so it cannot be a span "
                                f"of prompt {prompt!r}")
            if prompt.find(span) != ranges[field][0]:
                raise DataError(f"fact {fact.id!r}: span {field!r} = {span!r} also occurs earlier in "
                                f"the prompt {prompt!r}, so locating it by its text would pick the "
                                "wrong tokens")
        answer = str(fact.fields[answer_field])
        if not answer.strip():
            raise DataError(f"fact {fact.id!r}: the answer field {answer_field!r} is empty")
        if answer in prompt:
            raise DataError(f"fact {fact.id!r}: the answer {answer!r} ({answer_field}) occurs in its "
                            f"own prompt {prompt!r}")
        examples.append(TestExample(fact_id=fact.id, template=name, prompt=prompt, spans=spans,
                                    answer=answer))

    if not allow_ambiguous:
        answers: dict[str, dict[str, str]] = defaultdict(dict)
        for ex in examples:
            answers[ex.prompt].setdefault(ex.answer, ex.fact_id)
        clashes = {p: a for p, a in answers.items() if len(a) > 1}
        if clashes:
            prompt, by_answer = next(iter(clashes.items()))
            detail = ", ".join(f"{a!r} (fact {i!r})" for a, i in by_answer.items())
            raise DataError(
                f"test template {name!r} gives {len(clashes)} prompt(s) more than one answer, e.g. "
                f"{prompt!r} → {detail}; use a template that tells them apart (e.g. one with "
                "{movie_title}) or pass allow_ambiguous=True")
    return examples


def __getattr__(name: str) -> object:
    """Names that moved out of this module (reading templates from files, to
    :mod:`nngraft.study.template_files`), for one release."""
    if name.startswith("__"):  # the import system's probes: not a moved name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..deprecated import moved_name

    return moved_name(__name__, name)
