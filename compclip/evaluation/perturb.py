"""Word-order perturbations of ARO's COCO-Order and Flickr30k-Order sets.

For each caption, four perturbed versions (ARO, Yuksekgonul et al. 2023, §3):
1. nouns shuffled among the noun positions and adjectives among the adjective positions;
2. every word that is neither a noun nor an adjective shuffled among those positions;
3. the trigrams (consecutive groups of 3 words; the last may be shorter) shuffled as blocks;
4. the words shuffled within each trigram.
Nouns (NN, NNS, NNP, NNPS) and adjectives (JJ, JJR, JJS) are spaCy's Penn Treebank tags. One seeded
`random.Random` draws every shuffle in caption order, so a seed gives the same set of captions every time.
"""
from __future__ import annotations

import random
from typing import List, Sequence

from compclip import spacy_pipeline

NOUN_TAGS = {"NN", "NNS", "NNP", "NNPS"}
ADJECTIVE_TAGS = {"JJ", "JJR", "JJS"}


def load_spacy(name: str):
    """The spaCy pipeline `name` with only what POS tagging needs, or a RuntimeError saying how to get it."""
    return spacy_pipeline.load_spacy(name, exclude=("parser", "ner", "lemmatizer"),
                                     needed_for="the POS tags of COCO-Order / Flickr30k-Order",
                                     setting="EvalConfig.spacy_model / --spacy-model")


def _shuffle_positions(words: List[str], positions: Sequence[int], rng: random.Random) -> List[str]:
    picked = [words[position] for position in positions]
    rng.shuffle(picked)
    result = list(words)
    for position, word in zip(positions, picked):
        result[position] = word
    return result


def _trigrams(words: Sequence[str]) -> List[List[str]]:
    return [list(words[start:start + 3]) for start in range(0, len(words), 3)]


class OrderPerturber:
    def __init__(self, spacy_model: str = "en_core_web_sm", seed: int = 0):
        self.nlp = load_spacy(spacy_model)
        self.rng = random.Random(seed)

    def perturb_all(self, captions: Sequence[str]) -> List[List[str]]:
        """For each caption, its four perturbations in the order of the module docstring."""
        out = []
        for doc in self.nlp.pipe(captions, batch_size=256):
            words = [token.text for token in doc]
            tags = [token.tag_ for token in doc]
            nouns = [i for i, tag in enumerate(tags) if tag in NOUN_TAGS]
            adjectives = [i for i, tag in enumerate(tags) if tag in ADJECTIVE_TAGS]
            others = [i for i, tag in enumerate(tags) if tag not in NOUN_TAGS and tag not in ADJECTIVE_TAGS]
            nouns_adjectives = _shuffle_positions(_shuffle_positions(words, nouns, self.rng), adjectives, self.rng)
            all_but = _shuffle_positions(words, others, self.rng)
            blocks = _trigrams(words)
            self.rng.shuffle(blocks)
            within = []
            for block in _trigrams(words):
                self.rng.shuffle(block)
                within.extend(block)
            out.append([" ".join(nouns_adjectives), " ".join(all_but),
                        " ".join(word for block in blocks for word in block), " ".join(within)])
        return out
