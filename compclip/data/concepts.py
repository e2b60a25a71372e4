"""Concepts (C2LIP): short noun phrases of a caption, from spaCy's noun chunks with determiners stripped."""
from __future__ import annotations

from compclip import spacy_pipeline

# Leading words that do not belong to a concept: articles, demonstratives, possessives, quantifier words.
_STRIP_TAGS = {"DT", "PDT", "PRP$", "WDT", "WP$", "POS"}


def load_spacy(model: str):
    """The spaCy pipeline for noun chunks and tags (no NER, no lemmas), or a RuntimeError saying what to install."""
    return spacy_pipeline.load_spacy(model, exclude=("ner", "lemmatizer"), needed_for="concepts and negatives",
                                     setting="data.spacy_model / --spacy-model")


def chunk_phrase(chunk) -> str:
    """The noun chunk without leading determiners / possessives; '' for a bare pronoun."""
    tokens = list(chunk)
    while tokens and (tokens[0].tag_ in _STRIP_TAGS or tokens[0].pos_ == "DET"):
        tokens = tokens[1:]
    if not tokens or all(token.pos_ == "PRON" for token in tokens):
        return ""
    return "".join(token.text_with_ws for token in tokens).strip()


def doc_concepts(doc) -> list[str]:
    phrases: list[str] = []
    for chunk in doc.noun_chunks:
        phrase = chunk_phrase(chunk)
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    return phrases


class ConceptExtractor:
    """Callable `list[str] -> list[list[str]]`; the spaCy pipeline loads lazily (once per worker process) and
    is not pickled with the extractor."""

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 256):
        self.model = model
        self.batch_size = batch_size
        self._nlp = None

    def __getstate__(self):
        return {"model": self.model, "batch_size": self.batch_size, "_nlp": None}

    @property
    def nlp(self):
        if self._nlp is None:
            self._nlp = load_spacy(self.model)
        return self._nlp

    def __call__(self, texts: list[str]) -> list[list[str]]:
        return [doc_concepts(doc) for doc in self.nlp.pipe(texts, batch_size=self.batch_size)]
