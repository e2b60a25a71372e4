"""The preparation command: typed negatives, concepts, LLM negatives, shards, and resuming after a stop."""
import json
import os

import pytest

from compclip.data import DataConfig, build_dataloader
from compclip.data import prepare
from compclip.data.negatives import normalise
from compclip.data.shards import iter_tar_samples

import datatest_support as support

CAPTIONS = ["A dog chases a red ball near a tree.", "A woman holds a blue umbrella.", "Two cats sleep on a sofa.",
            "A man rides a horse on a beach.", "A small boat floats on calm water."]


def _input(tmp_path):
    rows = []
    for i, caption in enumerate(CAPTIONS):
        support.write_png(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": caption})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, *extra):
    output = tmp_path / "out" / "prepared.jsonl"
    prepare.main(["--input", str(_input(tmp_path)), "--output", str(output), "--spacy-model", support.SPACY_MODEL,
                  "--chunk-size", "2", "--batch-size", "2", *extra])
    with open(output) as handle:
        return output, [json.loads(line) for line in handle]


def test_typed_negatives_concepts_and_relative_paths(tmp_path):
    output, rows = _run(tmp_path)
    assert len(rows) == 5
    for row, caption in zip(rows, CAPTIONS):
        assert row["caption"] == caption
        assert row["negative_types"] == ["relation_swap", "attribute_replace", "object_replace", "action_replace"]
        assert len(row["negatives"]) == len(row["valid"]) == 4
        for text, valid in zip(row["negatives"], row["valid"]):
            assert text == "###" or normalise(text) != normalise(caption)
            assert valid == (text != "###") or row["negatives"][0] == text  # only relation swaps may be invalid text
        assert os.path.exists(os.path.join(output.parent, row["image"]))
    assert rows[0]["negatives"][0] == "A ball chases a red dog near a tree."  # nouns dog, ball, tree -> valid
    assert rows[0]["valid"][0] is True
    assert rows[1]["valid"][0] is False  # woman, umbrella: two nouns only
    assert rows[0]["concepts"] == ["dog", "red ball", "tree"]
    batch = next(iter(build_dataloader(DataConfig(train_manifest=str(output), batch_size=5), support.tokenizer(),
                                       support.to_tensor, rank=0, world_size=1, seed=0)))
    assert batch["negatives"].shape == (5, 4, 77)
    assert int(batch["valid"].sum()) == sum(sum(row["valid"]) for row in rows)


def test_rerun_continues_after_the_last_finished_chunk(tmp_path):
    output, first = _run(tmp_path)
    work = str(output) + ".work"
    with open(os.path.join(work, "progress.json")) as handle:
        assert json.load(handle)["done"] == 3
    # Pretend the run stopped after chunk 0, whose part we mark: a rerun must keep it and redo chunks 1-2.
    marked = os.path.join(work, "part-000000.jsonl")
    with open(marked) as handle:
        lines = [json.loads(line) for line in handle]
    lines[0]["caption"] = "kept from the first run"
    with open(marked, "w") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
    os.remove(os.path.join(work, "part-000002.jsonl"))
    with open(os.path.join(work, "progress.json")) as handle:
        progress = json.load(handle)
    progress["done"] = 1
    with open(os.path.join(work, "progress.json"), "w") as handle:
        json.dump(progress, handle)
    _, second = _run(tmp_path)
    assert second[0]["caption"] == "kept from the first run"
    assert second[1:] == first[1:]


def test_llm_negatives_and_shards(tmp_path):
    llm = tmp_path / "llm.json"
    llm.write_text(json.dumps([{"image_id": 1, "original": CAPTIONS[1], "enhanced": ["A woman holds a red umbrella.",
                                                                                     CAPTIONS[1]]}]))
    shards = tmp_path / "shards"
    prepare.main(["--input", str(_input(tmp_path)), "--output-shards", str(shards), "--types", "swap_nouns",
                  "--llm-negatives", str(llm), "--spacy-model", support.SPACY_MODEL, "--no-concepts"])
    with open(shards / "manifest.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    assert rows[1]["negatives"] == ["A blue umbrella holds a woman.", "A woman holds a red umbrella."]
    assert rows[1]["valid"] == [True, True] and "concepts" not in rows[1]
    samples = list(iter_tar_samples(str(shards / "shard-000000.tar")))
    assert len(samples) == 5 and json.loads(samples[1]["json"])["caption"] == CAPTIONS[1]


def test_unknown_type_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--input", str(_input(tmp_path)), "--output", str(tmp_path / "o.jsonl"), "--types", "nope"])
    assert stopped.value.code == 2 and "unknown negative types ['nope']" in capsys.readouterr().err
