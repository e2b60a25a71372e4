"""Offline preparation: `python -m compclip.data.prepare` (console script `compclip-prepare`).

Reads a manifest (JSONL / CSV / TSV, NegCLIP's TSV included) or a published-format file (`--input-format
negclip|ceclip|degla|c2lip|coco|karpathy`), adds rule-based hard negatives (`--types`, in slot order),
LLM-written negatives (`--llm-negatives`: DeGLA's JSON or JSONL `{"caption", "negatives"}`, matched by caption)
and noun-phrase concepts, and writes a JSONL manifest (`--output`) and/or WebDataset shards (`--output-shards`).

Resumable: work goes to `<output>.work/` in chunks of `--chunk-size` rows (`part-NNNNNN.jsonl`) with a
`progress.json`; a rerun with the same arguments continues after the last finished chunk. Every sample's
random choices are seeded by (seed, row number), so the result does not depend on chunking or restarts.

Bad input (a malformed file, row or field, an unreadable or unsafe pickle) stops the command before any work
with one message naming the file, the line or item and the field, and exit status 2 (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import pickle
import random
import sys

from compclip.progress import Progress, track

from .concepts import doc_concepts, load_spacy
from .importers import (DEFAULT_IMAGE_TEMPLATE, IMPORTERS, KARPATHY_TRAIN_SPLITS, TEMPLATED, check_image_template,
                        import_records)
from .inputs import InputError, check_text, parse_json, read_text
from .manifest import INVALID_NEGATIVE, ManifestError, detect_format, iter_rows, make_record, write_jsonl
from .negatives import ALL_TYPES, CECLIP_TYPES, DEGLA_TYPES, NegativeGenerator, Vocabulary, normalise

log = logging.getLogger("compclip.prepare")

TYPE_HELP = {
    "reshuffle": "the caption's words in another order (DeGLA)",
    "swap_nouns": "two noun phrases exchanged, determiners and modifiers travelling with them (DeGLA)",
    "swap_adjectives": "the modifiers of two noun phrases exchanged, colours first (DeGLA)",
    "replace_adjectives": "one adjective replaced by another of the corpus with the same tag (DeGLA)",
    "replace_nouns": "one noun replaced by another of the corpus with the same tag (DeGLA)",
    "relation_swap": "the first two nouns exchanged; valid only with at least 3 nouns, as in the paper (CE-CLIP)",
    "attribute_replace": "one adjective replaced by a same-tag word of the corpus (CE-CLIP)",
    "object_replace": "one noun replaced by a same-tag word of the corpus (CE-CLIP)",
    "action_replace": "one verb replaced by a same-tag word of the corpus (CE-CLIP)",
}
"""What each `--types` entry writes; a caption that offers nothing to change gets `'###'`, marked invalid."""


def read_input(path: str, input_format: str, image_root: str = "", *, image_template: str = DEFAULT_IMAGE_TEMPLATE,
               splits=KARPATHY_TRAIN_SPLITS) -> tuple[list[dict], list[str]]:
    """(rows, where each row comes from): the input's rows, checked, image paths resolved."""
    if input_format in IMPORTERS:
        records = import_records(path, input_format, image_root, image_template=image_template, splits=splits)
        return [record.to_json() for record in records], [record.source for record in records]
    fmt = detect_format(path, "auto" if input_format == "manifest" else input_format)
    if fmt == "wds":
        raise ManifestError(f"{path}: WebDataset shards are read by the loader directly; prepare takes a manifest")
    base = image_root or os.path.dirname(os.path.abspath(path))
    rows, sources = [], []
    for line, row in iter_rows(path, fmt):
        record = make_record(row, f"{path}:{line}", base)
        extra = {k: v for k, v in row.items() if k not in ("image", "caption", "negatives", "valid", "concepts")}
        for key, value in extra.items():  # kept in the output, so they must be writable back as UTF-8 JSON
            try:
                json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as error:
                raise ManifestError(f"{record.source}: field {key[:80]!r} holds text that is not valid Unicode "
                                    f"({error.reason})") from None
        rows.append({**extra, **record.to_json()})
        sources.append(record.source)
    if not rows:
        raise ManifestError(f"{path}:1: the manifest holds no samples")
    return rows, sources


def read_llm_negatives(path: str) -> dict[str, list[str]]:
    """Caption -> negatives, from DeGLA's JSON (`original`, `enhanced`) or JSONL (`caption`, `negatives`)."""
    text = read_text(path, ManifestError)
    try:
        entries = parse_json(text, path, ManifestError)
    except ManifestError:  # not one JSON document: JSONL, whose own errors name the line
        numbered = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        entries = [parse_json(line, f"{path}:{number}", ManifestError, whole_file=False) for number, line in numbered]
        sources = [f"{path}:{number}" for number, _ in numbered]
    else:
        if isinstance(entries, dict):
            entries = [entries] if {"original", "caption"} & set(entries) else list(entries.values())
        if not isinstance(entries, list):
            raise ManifestError(f"{path}: expected a list of {{original, enhanced}} objects")
        sources = [f"{path}: item {number}" for number in range(len(entries))]
    out: dict[str, list[str]] = {}
    for entry, source in zip(entries, sources):
        if not isinstance(entry, dict):
            raise ManifestError(f"{source}: expected an object, got {type(entry).__name__}")
        caption_key = "original" if "original" in entry else "caption"
        negatives_key = "enhanced" if "enhanced" in entry else "negatives"
        caption, negatives = entry.get(caption_key), entry.get(negatives_key)
        if caption is None:
            continue
        negatives = [negatives] if isinstance(negatives, str) else negatives or []
        try:
            if not isinstance(caption, str):
                raise ValueError(f"field {caption_key!r} must be a string")
            check_text(caption, caption_key)
            if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
                raise ValueError(f"field {negatives_key!r} must be a list of strings")
            for negative in negatives:
                check_text(negative, negatives_key)
        except ValueError as error:
            raise ManifestError(f"{source}: {error}") from None
        out.setdefault(caption.strip(), []).extend(negatives)
    return out


def _fingerprint(args: argparse.Namespace, rows: list[dict]) -> str:
    """What a finished chunk depends on: the options that shape a row and the imported rows themselves."""
    keys = ("input", "input_format", "types", "seed", "concepts", "llm_negatives", "spacy_model", "regenerate",
            "chunk_size")
    digest = hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode())
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def _load_progress(path: str, fingerprint: str) -> dict | None:
    """The saved progress of this same job, or None (none saved, another job's, or unreadable)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s); starting the preparation over", path, error)
        return None
    if isinstance(previous, dict) and previous.get("fingerprint") == fingerprint \
            and isinstance(previous.get("done"), int):
        return previous
    return None


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


class PrepareError(Exception):
    """The preparation cannot run as asked (spaCy missing, a work folder changed under it); says what to do."""


def parse_types(text: str) -> list[str]:
    """The `--types` list; a ValueError names unknown entries."""
    types = [t.strip() for t in text.split(",") if t.strip()] if text else []
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown:
        raise ValueError(f"unknown negative types {unknown} ({', '.join(ALL_TYPES)})")
    return types


def _relative_to(path: str, base: str) -> str:
    """`path` relative to `base` when it lies inside `base`; otherwise unchanged (a `../` path would climb out of
    the folder the loader resolves it against, which the loader refuses)."""
    relative = os.path.relpath(path, base)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def run(args: argparse.Namespace) -> str:
    types = parse_types(args.types)
    rows, sources = read_input(args.input, args.input_format, args.image_root,
                               image_template=args.image_template, splits=args.split.split(","))
    llm = read_llm_negatives(args.llm_negatives) if args.llm_negatives else {}
    needs_spacy = bool(types) or args.concepts
    try:
        nlp = load_spacy(args.spacy_model) if needs_spacy else None
    except RuntimeError as error:  # spaCy or the pipeline is missing; the message says what to install
        raise PrepareError(str(error)) from None
    if nlp is not None:
        too_long = next(((row, source) for row, source in zip(rows, sources) if len(row["caption"]) > nlp.max_length),
                        None)
        if too_long is not None:
            raise ManifestError(f"{too_long[1]}: field 'caption' has {len(too_long[0]['caption'])} characters, more "
                                f"than spaCy's limit of {nlp.max_length}: not a caption")
    output = args.output or os.path.join(args.output_shards, "manifest.jsonl")
    work = output + ".work"
    os.makedirs(work, exist_ok=True)
    progress_path = os.path.join(work, "progress.json")
    fingerprint = _fingerprint(args, rows)
    progress = _load_progress(progress_path, fingerprint)
    if progress is None:
        for stale in glob.glob(os.path.join(work, "*")):
            os.remove(stale)
        progress = {"fingerprint": fingerprint, "done": 0}
    captions = [row["caption"] for row in rows]
    needs_vocabulary = any(t.startswith("replace") or t.endswith("_replace") for t in types)
    vocabulary = (build_vocabulary(nlp, captions, args.batch_size, os.path.join(work, "vocabulary.json"))
                  if needs_vocabulary else Vocabulary())
    generator = NegativeGenerator(vocabulary)
    chunks = range(0, len(rows), args.chunk_size)
    bar = Progress(len(rows), "prepare", unit="rows", initial=min(len(rows), progress["done"] * args.chunk_size),
                   logger=log)
    for number, start in enumerate(chunks):
        if number < progress["done"]:
            continue
        part = rows[start : start + args.chunk_size]
        docs = (nlp.pipe([row["caption"] for row in part], batch_size=args.batch_size) if nlp is not None
                else [None] * len(part))
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
                        row["image"] = _relative_to(row["image"], base)
                    yield row

    count = write_jsonl(output, merged())
    if count != len(rows):  # a part file changed under us: never write a manifest that silently lost rows
        raise PrepareError(f"{output}: wrote {count} rows for {len(rows)} input rows; remove {work} and rerun")
    if args.output_shards:
        from .shards import write_shards

        write_shards(list(merged()), args.output_shards, max_count=args.shard_size, base_dir=base)
    log.info("wrote %d samples to %s", count, output)
    return output


def _types_epilog() -> str:
    width = max(map(len, TYPE_HELP))
    lines = [f"  {name:<{width}}  {text}" for name, text in TYPE_HELP.items()]
    return ("negative types (--types, comma-separated, in slot order: slot k of every row holds type k):\n"
            + "\n".join(lines)
            + f"\n  DeGLA's five: --types {','.join(DEGLA_TYPES)}"
            + f"\n  CE-CLIP's four (the default): --types {','.join(CECLIP_TYPES)}"
            + "\n  --types '' adds none. A caption that offers nothing to change gets '###', marked invalid.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compclip-prepare", description=__doc__.split("\n\n")[0],
                                epilog=_types_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="manifest or published-format file")
    p.add_argument("--input-format", default="manifest", choices=["manifest", "jsonl", "csv", "tsv", *IMPORTERS],
                   help="manifest (from the suffix; a TSV with NegCLIP's columns is read as NegCLIP's), or a "
                        "release format: negclip TSV, ceclip .npy, degla JSON, c2lip .pkl, coco captions JSON, "
                        "karpathy split JSON")
    p.add_argument("--image-root", default="",
                   help="folder relative image paths resolve against (default: the input file's folder); a "
                        "relative path may not climb out of it")
    p.add_argument("--image-template", default=DEFAULT_IMAGE_TEMPLATE,
                   help=f"file name of an image id for {'/'.join(TEMPLATED)} (str.format with the field 'id'), "
                        "relative to --image-root")
    p.add_argument("--split", default=",".join(KARPATHY_TRAIN_SPLITS),
                   help="karpathy: the splits to import, comma-separated (train, restval, val, test); the default "
                        "is COCO's 113,287 training images")
    p.add_argument("--output", default="", help="JSONL manifest to write")
    p.add_argument("--output-shards", default="", help="folder for WebDataset shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--types", default=",".join(CECLIP_TYPES),
                   help="negative types to generate, comma-separated, in slot order; '' for none (see below)")
    p.add_argument("--regenerate", action="store_true", help="replace negatives the input already has")
    p.add_argument("--llm-negatives", default="", help="DeGLA JSON or JSONL {caption, negatives} to add")
    p.add_argument("--no-concepts", dest="concepts", action="store_false", help="do not add concepts")
    p.add_argument("--spacy-model", default="en_core_web_sm", help="installed spaCy English pipeline")
    p.add_argument("--batch-size", type=int, default=256, help="nlp.pipe batch size")
    p.add_argument("--chunk-size", type=int, default=10000, help="rows per resumable chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--absolute-paths", dest="relative_paths", action="store_false",
                   help="keep absolute image paths (default: relative to the output's folder when inside it)")
    return p


BAD_INPUT = (InputError, pickle.UnpicklingError, OSError, PrepareError)
"""What a malformed, unsafe or unreadable input (or a missing tool) raises; each names its file or the fix
(UnsafePickleError and CorruptPickleError are UnpicklingErrors)."""


def main(argv: list[str] | None = None) -> None:
    """The command: one message and exit status 2 on bad input or arguments, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = parser()
    args = p.parse_args(argv)
    if not args.output and not args.output_shards:
        p.error("give --output and/or --output-shards")
    for check, value in ((parse_types, args.types), (check_image_template, args.image_template)):
        try:
            check(value)
        except ValueError as error:
            p.error(str(error))
    if args.chunk_size < 1 or args.batch_size < 1 or args.shard_size < 1:
        p.error("--chunk-size, --batch-size and --shard-size must be at least 1")
    try:
        run(args)
    except BAD_INPUT as error:
        p.exit(2, f"compclip-prepare: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
