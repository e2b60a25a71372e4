"""Rule-based negatives and concepts on hand-checked captions, and the SugarCrepe acceptance rates."""
import json
import os
import random
import time

import pytest

from compclip.data.concepts import ConceptExtractor
from compclip.data.negatives import (INVALID, NegativeGenerator, Vocabulary, normalise, relation_swap, reshuffle,
                                     swap_adjectives, swap_nouns)

import datatest_support as support

# SugarCrepe annotations, in the data folder beside the checkout (see tests/evaluation/evaltest_helpers.py).
SUGARCREPE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "sugarcrepe")


def parse(text):
    return support.nlp()(text)


def test_swap_adjectives_exchanges_attributes_of_two_objects():
    assert swap_adjectives(parse("A man in a red shirt rides a yellow surfboard."))[0] == \
        "A man in a yellow shirt rides a red surfboard."
    assert swap_adjectives(parse("Blue bathroom with two white towels."))[0] == "White bathroom with two blue towels."
    assert swap_adjectives(parse("A dog sleeps.")) == []


def test_swap_nouns_exchanges_whole_noun_phrases():
    assert swap_nouns(parse("A woman prepares a pizza while a man watches."))[0] == \
        "A man prepares a pizza while a woman watches."
    assert swap_nouns(parse("A toaster sits on a kitchen shelf in front of a blender."))[0] == \
        "A blender sits on a kitchen shelf in front of a toaster."


def test_relation_swap_is_valid_only_with_three_nouns():
    assert relation_swap(parse("A dog chases a cat near a tree.")) == ("A cat chases a dog near a tree.", True)
    assert relation_swap(parse("A dog chases a cat.")) == ("A cat chases a dog.", False)
    assert relation_swap(parse("It is here.")) == (INVALID, False)


def test_replacements_keep_the_tag_and_never_equal_the_caption():
    corpus = ["A red car drives past tall trees.", "Two dogs are running on green grass.",
              "A blue bus parks near small houses.", "A cat is sleeping on a wooden chair."]
    vocabulary = Vocabulary().add_docs(support.nlp().pipe(corpus))
    assert {"red", "tall", "green", "blue", "small", "wooden"} <= set(vocabulary.choices("JJ")[0])
    generator = NegativeGenerator(vocabulary)
    doc = parse("A red car drives past tall trees.")
    for seed in range(10):
        made = generator.generate(doc, ["attribute_replace", "object_replace", "action_replace", "reshuffle",
                                        "replace_nouns", "replace_adjectives"], random.Random(seed))
        for kind, (text, valid) in made.items():
            if valid:
                assert normalise(text) != normalise(doc.text), kind
        for kind in ("object_replace", "attribute_replace", "action_replace"):
            text, valid = made[kind]
            if not valid:
                continue
            replaced = [(token, word) for token, word in zip(doc, parse(text)) if token.text != word.text]
            assert len(replaced) == 1, (kind, text)
            token, word = replaced[0]
            # the new word has the old word's fine-grained tag in the corpus (plural for plural, ...)
            assert word.lower_ in vocabulary.choices(token.tag_)[0], (kind, token.tag_, word.text)
    assert reshuffle(parse("a"), random.Random(0)) == []


def test_concepts_are_noun_chunks_without_determiners():
    extractor = ConceptExtractor(support.SPACY_MODEL)
    extractor._nlp = support.nlp()
    assert extractor(["A big red cube is left of a small blue ball.", "It is here."]) == \
        [["big red cube", "small blue ball"], []]


def _rate(name, generator):
    with open(os.path.join(SUGARCREPE, f"{name}.json")) as handle:
        entries = list(json.load(handle).values())
    docs = support.nlp().pipe([e["caption"] for e in entries], batch_size=256)
    hits = sum(1 for entry, doc in zip(entries, docs)
               if (found := generator(doc)) and normalise(found[0]) == normalise(entry["negative_caption"]))
    return hits / len(entries), len(entries)


@pytest.mark.skipif(not os.path.isdir(SUGARCREPE), reason="SugarCrepe annotations not available")
def test_sugarcrepe_swaps_reproduce_the_benchmark_negatives():
    """Exact match (case- and punctuation-insensitive) of our *primary* candidate with SugarCrepe's own
    negative_caption, over the whole files. Measured with en_core_web_sm 3.8: swap_att 0.396 (264/666),
    swap_obj 0.331 (81/245). Ceilings of token-level rules: in 305/666 swap_att pairs the negative is the
    caption with exactly two words exchanged; the others rewrite number agreement or move phrases. Floors are
    a little below the measured rates."""
    started = time.perf_counter()
    att, att_total = _rate("swap_att", swap_adjectives)
    obj, obj_total = _rate("swap_obj", swap_nouns)
    assert (att_total, obj_total) == (666, 245)
    assert att >= 0.37, att
    assert obj >= 0.30, obj
    assert time.perf_counter() - started < 30


def test_loader_derives_missing_concepts_with_spacy(tmp_path):
    from compclip.data import DataConfig, build_dataloader

    support.write_png(tmp_path / "0.png")
    support.write_png(tmp_path / "1.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "0.png", "caption": "A big red cube near a blue ball."})
                                      + "\n" + json.dumps({"image": "1.png", "caption": "x", "concepts": []}) + "\n")
    cfg = DataConfig(train_manifest=str(tmp_path / "m.jsonl"), val_manifest=str(tmp_path / "m.jsonl"),
                     batch_size=2, concept_extractor="spacy", spacy_model=support.SPACY_MODEL)
    batch = next(iter(build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=0,
                                       train=False)))
    assert support.decoded(batch["concepts"]) == ["big red cube", "blue ball", "x"]
    assert batch["owner"].tolist() == [0, 0, 1]


def test_missing_spacy_pipeline_names_the_setting():
    """Data and evaluation load spaCy through one helper: a missing pipeline says which setting picks another."""
    from compclip.data.concepts import ConceptExtractor

    with pytest.raises(RuntimeError, match=r"'no_such_pipeline_xyz' is not installed .*data\.spacy_model"):
        ConceptExtractor("no_such_pipeline_xyz")(["a red cube"])
    # The official name falls back to its PyPI re-upload when only that is installed.
    from compclip.spacy_pipeline import load_spacy

    assert load_spacy("en_core_web_sm", exclude=("ner",), needed_for="a test", setting="--x").pipe_names
