"""The phrasebook grammar: parallel sentences whose word order and agreement differ by language."""

from __future__ import annotations

import pytest

from data_prep.corpus import grammar
from data_prep.corpus.grammar import LANGUAGES, Phrase, generate_sentences, split_sentences, vocabulary
from data_prep.corpus.word_clips import spoken_form


def noun(english: str) -> grammar.Noun:
    return next(n for n in grammar._lexicon()[0] if n.forms["en"][0] == english)


def adjective(english: str) -> grammar.Adjective:
    return next(a for a in grammar._lexicon()[1] if a.forms["en"][0] == english)


def phrase(english_noun: str, english_adjective: str | None = None, plural=False, determiner="the") -> dict:
    meaning = Phrase(noun(english_noun), english_adjective and adjective(english_adjective), plural, determiner)
    return {lang: " ".join(meaning.words(lang)) for lang in LANGUAGES}


def tokens(text: str) -> list[str]:
    return [spoken_form(t.strip("¿?.,")) for t in text.split()]


@pytest.fixture(scope="module")
def sentences():
    return generate_sentences(3000, seed=7)


def test_adjective_position_differs_by_language():
    assert phrase("cat", "black") == {"en": "the black cat", "es": "el gato negro", "fr": "le chat noir"}
    assert phrase("cat", "small") == {"en": "the small cat", "es": "el gato pequeño", "fr": "le petit chat"}


def test_gender_and_number_agreement():
    assert phrase("house", "white", plural=True) == {
        "en": "the white houses",
        "es": "las casas blancas",
        "fr": "les maisons blanches",
    }
    # the same meaning has different genders across languages: la voiture but el coche
    assert phrase("car", "new") == {"en": "the new car", "es": "el coche nuevo", "fr": "la nouvelle voiture"}
    assert phrase("key", None, determiner="a")["es"] == "una llave"
    assert phrase("apple", "red", plural=True, determiner="3")["fr"] == "trois pommes rouges"


def test_french_elision_vowel_forms_and_contractions():
    assert phrase("bird", "beautiful")["fr"] == "le bel oiseau"
    assert phrase("man", "old")["fr"] == "le vieil homme"
    assert (
        grammar._finish(["je", "achète", *Phrase(noun("egg"), None, False, "the").words("fr")], "fr")
        == "J'achète l'œuf."
    )
    assert grammar._finish(["près", "de", "le", "jardin"], "fr") == "Près du jardin."
    assert grammar._finish(["cerca", "de", "el", "río"], "es") == "Cerca del río."
    assert grammar._finish(["dónde", "está", "el", "gato"], "es", question=True) == "¿Dónde está el gato?"


def test_english_indefinite_article_follows_the_next_sound():
    assert phrase("apple", "red", determiner="a")["en"] == "a red apple"
    assert phrase("apple", "old", determiner="a")["en"] == "an old apple"
    assert phrase("umbrella", determiner="a")["en"] == "an umbrella"


def test_thousands_of_distinct_parallel_sentences(sentences):
    assert len(sentences) == 3000
    for lang in LANGUAGES:
        texts = [s.texts[lang] for s in sentences]
        assert len(set(texts)) == len(texts), lang
    assert len({s.sentence_id for s in sentences}) == 3000
    # the grammar does not run out: ten times more is still possible
    assert len(generate_sentences(30000, seed=7)) == 30000


def test_generation_is_seeded_and_prefix_stable(sentences):
    assert generate_sentences(3000, seed=7) == sentences
    assert generate_sentences(100, seed=7) == sentences[:100]
    assert [s.texts for s in generate_sentences(100, seed=8)] != [s.texts for s in sentences[:100]]


def test_word_order_really_differs(sentences):
    """English puts the adjective first, Spanish always after the noun, French mostly after."""
    adjectives = {lang: {f for a in grammar._lexicon()[1] for f in a.forms[lang]} for lang in LANGUAGES}
    described = [s for s in sentences if s.keywords["en"][0] in adjectives["en"]]
    assert len(described) > 500
    assert all(s.keywords["es"][0] not in adjectives["es"] for s in described)
    french_first = sum(s.keywords["fr"][0] in adjectives["fr"] for s in described)
    assert 0.1 < french_first / len(described) < 0.6


def test_keywords_are_words_of_the_sentence(sentences):
    for sentence in sentences:
        for lang in LANGUAGES:
            assert sentence.keywords[lang], (lang, sentence)
            assert set(sentence.keywords[lang]) <= set(tokens(sentence.texts[lang].lower())), (lang, sentence)


def test_vocabulary_covers_every_sentence_and_has_a_few_hundred_words(sentences):
    for lang in LANGUAGES:
        words = vocabulary(lang)
        assert 250 <= len(words) <= 1000, (lang, len(words))
        used = {w for s in sentences for w in tokens(s.texts[lang].lower())}
        assert used <= words, (lang, sorted(used - words)[:10])
    with pytest.raises(ValueError, match="unknown language 'de'"):
        vocabulary("de")


def test_split_keeps_test_sentences_out_of_training(sentences):
    splits = split_sentences(sentences, valid=100, test=200, seed=3)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [2700, 100, 200]
    for lang in LANGUAGES:
        train = {s.texts[lang] for s in splits["train"]}
        assert not train & {s.texts[lang] for s in splits["test"] + splits["valid"]}
    assert split_sentences(sentences, valid=100, test=200, seed=3) == splits
    with pytest.raises(ValueError, match="must leave training sentences"):
        split_sentences(sentences[:10], valid=5, test=5, seed=3)
