"""Rule-based hard negatives from a spaCy parse.

DeGLA's types: `reshuffle`, `swap_nouns`, `swap_adjectives`, `replace_adjectives`, `replace_nouns`.
CE-CLIP's types: `relation_swap` (the first two nouns exchanged; valid only with at least 3 nouns, as in the
paper), `attribute_replace`, `object_replace`, `action_replace`.

Every generator returns candidates, best first (an empty list when the caption offers nothing to change); a
candidate never equals its positive, case- and punctuation-insensitively. Replacements come from a
`Vocabulary` of same-tag words collected from the corpus (so a plural noun is replaced by a plural noun, a
gerund by a gerund), or from an optional fill-mask model.

How the swaps choose what to exchange (measured on SugarCrepe's swap_att / swap_obj captions, see the tests):
- `swap_adjectives` exchanges the modifiers of two different noun phrases. A phrase's modifier is its
  adjective (amod) or, failing that, its noun modifier (compound: "*brick* building"); numbers are left alone
  because exchanging them needs plural agreement. Pairs are ranked: colour words first, then two adjectives,
  then by position.
- `swap_nouns` exchanges two whole noun phrases (determiner and modifiers travel with the noun), ranked: two
  phrases naming people or two naming animals first, then same grammatical number, then by position.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Callable, Iterable

INVALID = "###"
DEGLA_TYPES = ("reshuffle", "swap_nouns", "swap_adjectives", "replace_adjectives", "replace_nouns")
CECLIP_TYPES = ("relation_swap", "attribute_replace", "object_replace", "action_replace")
ALL_TYPES = DEGLA_TYPES + CECLIP_TYPES

COLOURS = frozenset(
    "black white red blue green yellow orange purple pink brown gray grey silver gold golden tan beige "
    "maroon navy teal turquoise colorful colourful dark light".split())
PEOPLE = frozenset(
    "man men woman women boy boys girl girls person people child children kid kids lady ladies guy guys baby "
    "babies player players skier skiers surfer surfers skateboarder skateboarders mother father son daughter "
    "chef chefs officer officers worker workers couple family adult adults teenager teenagers crowd friends "
    "rider riders batter catcher umpire pitcher toddler student students gentleman women's".split())
ANIMALS = frozenset(
    "dog dogs cat cats horse horses cow cows bird birds elephant elephants giraffe giraffes zebra zebras sheep "
    "bear bears teddy puppy kitten duck ducks goat goats pigeon pigeons animal animals calf bull".split())


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: how negatives are compared with positives."""
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def _match_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() and not new[:1].isupper() else new


def render(doc, replacements: dict[int, str]) -> str:
    """The caption with token i replaced by replacements[i] (whitespace kept)."""
    return "".join((replacements.get(t.i, t.text)) + t.whitespace_ for t in doc).strip()


def swap_spans(doc, first, second) -> str:
    """The caption with two non-overlapping token spans exchanged; sentence-initial capitals follow the
    position, not the words."""
    if first.start > second.start:
        first, second = second, first

    def moved(span, into):
        text = span.text
        if span.start == 0 and text[:1].isupper() and span[0].pos_ != "PROPN":
            text = text[:1].lower() + text[1:]
        return _match_case(text, doc[into.start].text) if into.start == 0 else text

    parts = [doc[: first.start].text_with_ws, moved(second, first) + first[-1].whitespace_,
             doc[first.end : second.start].text_with_ws, moved(first, second) + second[-1].whitespace_,
             doc[second.end :].text_with_ws]
    return "".join(parts).strip()


def _distinct(caption: str, candidates: Iterable[str]) -> list[str]:
    """Candidates that differ from the caption and from each other (normalised), order kept."""
    seen = {normalise(caption)}
    out = []
    for text in candidates:
        key = normalise(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


# ---------------------------------------------------------------------------------------- vocabulary


class Vocabulary:
    """Words of the corpus by fine-grained tag (JJ, NN, NNS, VBG, ...), with counts; replacements are drawn
    from the same tag, weighted by frequency."""

    POS = {"ADJ": ("JJ", "JJR", "JJS"), "NOUN": ("NN", "NNS"), "VERB": ("VB", "VBD", "VBG", "VBN", "VBP", "VBZ")}

    def __init__(self, min_count: int = 1):
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.min_count = min_count

    def add(self, doc) -> None:
        for token in doc:
            if token.pos_ in self.POS and token.tag_ in self.POS[token.pos_] and token.text.isalpha():
                self.counts[token.tag_][token.text.lower()] += 1

    def add_docs(self, docs: Iterable) -> "Vocabulary":
        for doc in docs:
            self.add(doc)
        return self

    def choices(self, tag: str) -> tuple[list[str], list[int]]:
        words = sorted(w for w, c in self.counts.get(tag, {}).items() if c >= self.min_count)
        return words, [self.counts[tag][w] for w in words]

    def draw(self, tag: str, exclude: set[str], rng: random.Random) -> str | None:
        words, weights = self.choices(tag)
        pool = [(w, c) for w, c in zip(words, weights) if w not in exclude]
        if not pool:
            return None
        return rng.choices([w for w, _ in pool], weights=[c for _, c in pool])[0]

    def to_json(self) -> dict:
        return {tag: dict(sorted(counter.items())) for tag, counter in sorted(self.counts.items())}

    @classmethod
    def from_json(cls, data: dict, min_count: int = 1) -> "Vocabulary":
        vocabulary = cls(min_count)
        for tag, words in data.items():
            vocabulary.counts[tag] = Counter(words)
        return vocabulary


# ---------------------------------------------------------------------------------------- generators


def _chunks(doc) -> list:
    return [c for c in doc.noun_chunks if c.root.pos_ in ("NOUN", "PROPN") or c.root.tag_ in ("NN", "NNS")]


QUANTIFIERS = frozenset("several some many few multiple another one two three four five six".split())
_COLOUR, _ADJECTIVE, _NOUN_MODIFIER, _NUMBER = range(4)


def _phrase_head(doc, token) -> int:
    """The noun a pre-nominal modifier belongs to: the first noun to its right that is not itself a compound
    modifier ("a *red* fire hydrant" -> hydrant, "a white and *blue* vase" -> vase)."""
    for j in range(token.i + 1, len(doc)):
        if doc[j].pos_ in ("NOUN", "PROPN") and doc[j].dep_ != "compound":
            return j
        if doc[j].pos_ not in ("ADJ", "NOUN", "PROPN", "NUM", "VERB", "ADV", "CCONJ", "PUNCT"):
            break
    return token.i


def attribute_words(doc) -> list[tuple[object, int, int]]:
    """(token, kind, phrase head index) of every attributive word: colours, other adjectives in front of a
    noun, noun modifiers ("*brick* building"), numbers and quantifiers."""
    out = []
    for token in doc:
        word = token.lower_
        if not (token.text.isalpha() or token.like_num):
            continue
        attributive = token.dep_ in ("amod", "compound", "nmod", "nummod") and token.head.i > token.i or (
            token.dep_ == "conj" and token.head.dep_ == "amod")
        if token.pos_ == "NUM" or (word in QUANTIFIERS and token.dep_ in ("nummod", "amod", "det")):
            kind = _NUMBER
        elif word in COLOURS and (attributive or token.pos_ == "ADJ"):
            kind = _COLOUR
        elif (token.pos_ == "ADJ" or token.dep_ == "amod") and attributive:
            kind = _ADJECTIVE
        elif (token.pos_ in ("NOUN", "PROPN") and token.dep_ in ("compound", "nmod") and token.i + 1 < len(doc)
              and doc[token.i + 1].pos_ in ("NOUN", "PROPN")):
            kind = _NOUN_MODIFIER
        else:
            continue
        out.append((token, kind, _phrase_head(doc, token)))
    return out


def _as_moved(token) -> str:
    return token.text if token.pos_ == "PROPN" else token.lower_


def swap_adjectives(doc) -> list[str]:
    """Exchange the attribute words of two different noun phrases; ranked candidates (colours and adjectives
    before noun modifiers before numbers, then by position)."""
    words = attribute_words(doc)
    pairs = []
    for i, (first, first_kind, first_head) in enumerate(words):
        for second, second_kind, second_head in words[i + 1:]:
            if first_head == second_head or first.lower_ == second.lower_:
                continue
            pairs.append(((max(first_kind, second_kind), first.i, second.i), first, second))
    pairs.sort(key=lambda item: item[0])
    return _distinct(doc.text, (render(doc, {a.i: _match_case(_as_moved(b), a.text),
                                             b.i: _match_case(_as_moved(a), b.text)}) for _, a, b in pairs))


def _category(token) -> str:
    word = token.lower_
    if word in PEOPLE:
        return "person"
    if word in ANIMALS:
        return "animal"
    return ""


PLACE_WORDS = frozenset(
    "front top side middle edge back background foreground distance forefront bottom air left right center "
    "corner".split())
"""Nouns of complex prepositions ("in *front* of", "on *top* of"): not objects to swap."""
PARTITIVES = frozenset(
    "group bunch couple pair lot close view picture photo image painting piece half set sets herd flock variety "
    "kind type number row line pile".split())
"""Heads of "a *group* of ..." phrases: the object is what follows "of"."""
LOCATIVE_PREPOSITIONS = frozenset(("on", "in", "at", "into", "onto", "inside"))


def _swappable_chunks(doc) -> list:
    chunks = []
    for chunk in _chunks(doc):
        root = chunk.root
        if root.lower_ in PLACE_WORDS or root.pos_ == "PRON":
            continue
        if root.lower_ in PARTITIVES and chunk.end < len(doc) and doc[chunk.end].lower_ == "of":
            continue
        chunks.append(chunk)
    return chunks


def _is_location(chunk) -> bool:
    return chunk.root.dep_ == "pobj" and chunk.root.head.lower_ in LOCATIVE_PREPOSITIONS


def swap_nouns(doc) -> list[str]:
    """Exchange two whole noun phrases; ranked candidates: two people or two animals first, then pairs led by
    the earliest phrase, then partners that are not a location ("on a table"), then the farthest partner."""
    chunks = _swappable_chunks(doc)
    pairs = []
    for i, first in enumerate(chunks):
        for j in range(i + 1, len(chunks)):
            second = chunks[j]
            if first.root.lower_ == second.root.lower_:
                continue
            category = _category(first.root)
            same_category = bool(category) and category == _category(second.root)
            pairs.append(((not same_category, i, _is_location(second), -j), first, second))
    pairs.sort(key=lambda item: item[0])
    return _distinct(doc.text, (swap_spans(doc, a, b) for _, a, b in pairs))


def reshuffle(doc, rng: random.Random, tries: int = 5) -> list[str]:
    """The words in a random order (trailing punctuation stays at the end)."""
    words = [t.text for t in doc if not t.is_punct]
    end = doc[-1].text if len(doc) and doc[-1].is_punct else ""
    out = []
    for _ in range(tries):
        order = words[:]
        rng.shuffle(order)
        out.append(" ".join(order) + end)
    return _distinct(doc.text, out)[:1]


def relation_swap(doc) -> tuple[str, bool]:
    """CE-CLIP's relation negative: the first two nouns exchanged; valid only with at least 3 nouns.
    Fewer than 2 distinct nouns: `'###'`, invalid."""
    nouns = [t for t in doc if t.pos_ == "NOUN"]
    distinct = [n for n in nouns if n.lower_ != nouns[0].lower_][:1] if nouns else []
    if not distinct:
        return INVALID, False
    first, second = nouns[0], distinct[0]
    text = render(doc, {first.i: _match_case(second.lower_, first.text),
                        second.i: _match_case(first.lower_, second.text)})
    return (text, len(nouns) >= 3) if normalise(text) != normalise(doc.text) else (INVALID, False)


class Replacer:
    """Replaces one word of a given part of speech by a same-tag word of the vocabulary (or of the fill-mask
    model when one is given: `fill_mask(text_with_<mask>) -> candidate words, best first`)."""

    def __init__(self, vocabulary: Vocabulary, fill_mask: Callable[[str], list[str]] | None = None):
        self.vocabulary = vocabulary
        self.fill_mask = fill_mask

    def targets(self, doc, pos: str) -> list:
        if pos == "ADJ":
            return [t for t in doc if t.pos_ == "ADJ" and t.tag_ in Vocabulary.POS["ADJ"]]
        if pos == "VERB":
            return [t for t in doc if t.pos_ == "VERB" and t.tag_ in Vocabulary.POS["VERB"]]
        return [t for t in doc if t.pos_ == "NOUN" and t.tag_ in Vocabulary.POS["NOUN"]]

    def replace(self, doc, pos: str, rng: random.Random) -> list[str]:
        targets = self.targets(doc, pos)
        if not targets:
            return []
        target = rng.choice(targets)
        exclude = {t.lower_ for t in doc}
        word = None
        if self.fill_mask is not None:
            masked = render(doc, {target.i: "<mask>"})
            word = next((w.strip() for w in self.fill_mask(masked) if w.strip().lower() not in exclude
                         and w.strip().isalpha()), None)
        if word is None:
            word = self.vocabulary.draw(target.tag_, exclude, rng)
        if word is None:
            return []
        return _distinct(doc.text, [render(doc, {target.i: _match_case(word, target.text)})])


class NegativeGenerator:
    """All negative types of one caption, from its parse: `generate(doc, types, rng)` -> {type: (text, valid)}
    where text is `'###'` (invalid) when the type cannot be built for this caption."""

    def __init__(self, vocabulary: Vocabulary | None = None, fill_mask=None):
        self.replacer = Replacer(vocabulary or Vocabulary(), fill_mask)

    def candidates(self, doc, kind: str, rng: random.Random) -> list[str]:
        if kind == "swap_adjectives":
            return swap_adjectives(doc)
        if kind == "swap_nouns":
            return swap_nouns(doc)
        if kind == "reshuffle":
            return reshuffle(doc, rng)
        if kind == "relation_swap":
            text, _ = relation_swap(doc)
            return [] if text == INVALID else [text]
        pos = {"replace_adjectives": "ADJ", "attribute_replace": "ADJ", "replace_nouns": "NOUN",
               "object_replace": "NOUN", "action_replace": "VERB"}.get(kind)
        if pos is None:
            raise ValueError(f"unknown negative type {kind!r} ({', '.join(ALL_TYPES)})")
        return self.replacer.replace(doc, pos, rng)

    def generate(self, doc, types: Iterable[str], rng: random.Random) -> dict[str, tuple[str, bool]]:
        out = {}
        for kind in types:
            if kind == "relation_swap":
                out[kind] = relation_swap(doc)
                continue
            found = self.candidates(doc, kind, rng)
            out[kind] = (found[0], True) if found else (INVALID, False)
        return out
