"""Offline preparation: `python -m compclip.data.prepare` (console script `compclip-prepare`).

Reads a manifest (JSONL / CSV / TSV) or a published-format file (`--input-format negclip|ceclip|degla|c2lip`),
adds rule-based hard negatives (`--types`, in slot order), LLM-written negatives (`--llm-negatives`: DeGLA's
JSON or JSONL `{"caption", "negatives"}`, matched by caption) and noun-phrase concepts, and writes a JSONL
manifest (`--output`) and/or WebDataset shards (`--output-shards`).

Resumable: work goes to `<output>.work/` in chunks of `--chunk-size` rows (`part-NNNNNN.jsonl`) with a
`progress.json`; a rerun with the same arguments continues after the last finished chunk. Every sample's
random choices are seeded by (seed, row number), so the result does not depend on chunking or restarts.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import random
import sys

from compclip.progress import Progress, track

from .concepts import doc_concepts, load_spacy
from .importers import IMPORTERS, import_rows
from .manifest import INVALID_NEGATIVE, detect_format, iter_rows, make_record, write_jsonl
from .negatives import ALL_TYPES, CECLIP_TYPES, NegativeGenerator, Vocabulary, normalise

log = logging.getLogger("compclip.prepare")


def read_input(path: str, input_format: str, image_root: str = "") -> list[dict]:
    """Rows of the input (checked); image paths resolved."""
    if input_format in IMPORTERS:
        return import_rows(path, input_format, image_root)
    fmt = detect_format(path, "auto" if input_format == "manifest" else input_format)
    base = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    for line, row in iter_rows(path, fmt):
        record = make_record(row, f"{path}:{line}", base)
        extra = {k: v for k, v in row.items() if k not in ("image", "caption", "negatives", "valid", "concepts")}
        rows.append({**extra, **record.to_json()})
    return rows


def read_llm_negatives(path: str) -> dict[str, list[str]]:
    """Caption -> negatives, from DeGLA's JSON (`original`, `enhanced`) or JSONL (`caption`, `negatives`)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        entries = json.loads(text)
        entries = entries if isinstance(entries, list) else list(entries.values())
    except json.JSONDecodeError:
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    out: dict[str, list[str]] = {}
    for entry in entries:
        caption = entry.get("original", entry.get("caption"))
        negatives = entry.get("enhanced", entry.get("negatives")) or []
        if caption is not None:
            out.setdefault(caption.strip(), []).extend(str(n) for n in negatives)
    return out


def _fingerprint(args: argparse.Namespace, rows: list[dict]) -> str:
    keys = ("input", "input_format", "types", "seed", "concepts", "llm_negatives", "spacy_model", "regenerate",
            "chunk_size")
    digest = hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode())
    digest.update(str(len(rows)).encode())
    return digest.hexdigest()[:16]


def build_vocabulary(nlp, captions: list[str], batch_size: int, path: str) -> Vocabulary:
    """Same-tag word counts of the corpus (tagger only), cached in the work folder."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return Vocabulary.from_json(json.load(handle))
    vocabulary = Vocabulary()
    keep = [name for name in nlp.pipe_names if name in ("tok2vec", "tagger", "attribute_ruler")]
    with nlp.select_pipes(enable=keep):
        for doc in track(nlp.pipe(captions, batch_size=batch_size), total=len(captions), desc="vocabulary",
                         unit="captions", logger=log):
            vocabulary.add(doc)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(vocabulary.to_json(), handle)
    os.replace(path + ".tmp", path)
    return vocabulary


def prepare_rows(rows: list[dict], docs, generator: NegativeGenerator, types: list[str], seed: int, start: int,
                 llm: dict[str, list[str]], concepts: bool, regenerate: bool) -> list[dict]:
    out = []
    for offset, (row, doc) in enumerate(zip(rows, docs)):
        row = dict(row)
        caption = row["caption"]
        if types and (regenerate or row.get("negatives") is None):
            made = generator.generate(doc, types, random.Random(f"{seed}/{start + offset}"))
            row["negatives"] = [made[kind][0] for kind in types]
            row["valid"] = [made[kind][1] for kind in types]
            row["negative_types"] = list(types)
        extra = [n for n in llm.get(caption.strip(), []) if normalise(n) != normalise(caption)]
        if extra:
            negatives = list(row.get("negatives") or [])
            valid = list(row.get("valid") or [n != INVALID_NEGATIVE for n in negatives])
            row["negatives"], row["valid"] = negatives + extra, valid + [True] * len(extra)
            row.pop("negative_types", None)  # slots are no longer one per type
        if concepts and row.get("concepts") is None:
            row["concepts"] = doc_concepts(doc) or [caption]
        out.append(row)
    return out


def run(args: argparse.Namespace) -> str:
    rows = read_input(args.input, args.input_format, args.image_root)
    types = [t for t in args.types.split(",") if t] if args.types else []
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown:
        raise SystemExit(f"unknown negative types {unknown} ({', '.join(ALL_TYPES)})")
    output = args.output or os.path.join(args.output_shards, "manifest.jsonl")
    work = output + ".work"
    os.makedirs(work, exist_ok=True)
    progress_path = os.path.join(work, "progress.json")
    fingerprint = _fingerprint(args, rows)
    progress = {"fingerprint": fingerprint, "done": 0}
    if os.path.exists(progress_path):
        with open(progress_path, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous.get("fingerprint") == fingerprint:
            progress = previous
        else:
            for stale in glob.glob(os.path.join(work, "*")):
                os.remove(stale)
    nlp = load_spacy(args.spacy_model)
    captions = [row["caption"] for row in rows]
    needs_vocabulary = any(t.startswith("replace") or t.endswith("_replace") for t in types)
    vocabulary = (build_vocabulary(nlp, captions, args.batch_size, os.path.join(work, "vocabulary.json"))
                  if needs_vocabulary else Vocabulary())
    generator = NegativeGenerator(vocabulary)
    llm = read_llm_negatives(args.llm_negatives) if args.llm_negatives else {}
    chunks = range(0, len(rows), args.chunk_size)
    bar = Progress(len(rows), "prepare", unit="rows", initial=min(len(rows), progress["done"] * args.chunk_size),
                   logger=log)
    for number, start in enumerate(chunks):
        if number < progress["done"]:
            continue
        part = rows[start : start + args.chunk_size]
        docs = nlp.pipe([row["caption"] for row in part], batch_size=args.batch_size)
        prepared = prepare_rows(part, docs, generator, types, args.seed, start, llm, args.concepts, args.regenerate)
        write_jsonl(os.path.join(work, f"part-{number:06d}.jsonl"), prepared)
        progress["done"] = number + 1
        with open(progress_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(progress, handle)
        os.replace(progress_path + ".tmp", progress_path)
        bar.update(len(part))
    bar.close()
    base = os.path.dirname(os.path.abspath(output))

    def merged():
        for number in range(len(chunks)):
            with open(os.path.join(work, f"part-{number:06d}.jsonl"), encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    if args.relative_paths and os.path.isabs(row["image"]):
                        row["image"] = os.path.relpath(row["image"], base)
                    yield row

    count = write_jsonl(output, merged())
    if args.output_shards:
        from .shards import write_shards

        write_shards(list(merged()), args.output_shards, max_count=args.shard_size, base_dir=base)
    log.info("wrote %d samples to %s", count, output)
    return output


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compclip-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="manifest or published-format file")
    p.add_argument("--input-format", default="manifest", choices=["manifest", "jsonl", "csv", "tsv", *IMPORTERS])
    p.add_argument("--image-root", default="", help="folder relative image paths resolve against")
    p.add_argument("--output", default="", help="JSONL manifest to write")
    p.add_argument("--output-shards", default="", help="folder for WebDataset shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--types", default=",".join(CECLIP_TYPES),
                   help=f"negative types in slot order, comma-separated, '' for none ({', '.join(ALL_TYPES)})")
    p.add_argument("--regenerate", action="store_true", help="replace negatives the input already has")
    p.add_argument("--llm-negatives", default="", help="DeGLA JSON or JSONL {caption, negatives} to add")
    p.add_argument("--no-concepts", dest="concepts", action="store_false", help="do not add concepts")
    p.add_argument("--spacy-model", default="en_core_web_sm", help="installed spaCy English pipeline")
    p.add_argument("--batch-size", type=int, default=256, help="nlp.pipe batch size")
    p.add_argument("--chunk-size", type=int, default=10000, help="rows per resumable chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--absolute-paths", dest="relative_paths", action="store_false",
                   help="keep absolute image paths (default: relative to the output's folder)")
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    if not args.output and not args.output_shards:
        raise SystemExit("give --output and/or --output-shards")
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
