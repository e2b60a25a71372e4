"""The fuzz suite's engine: mutations of valid files, a time bound per case, the outcome rules, the case record.

Every fuzz test takes a valid file from `seed_fixtures`, lets Hypothesis draw a few mutations, writes the mutated
file and runs one reader on it. The outcome must be one of (docs/reliability.md, "Bad input"):

- accepted: the reader returns, and the test's oracle (an independent count of the file's samples) shows that no
  sample was lost;
- skipped and counted: a sample the loader cannot use is counted (images, shard samples);
- an error of the project's input-error types whose message names the file (and, for line formats, `file:line`).

Anything else fails the test: another exception (a bare traceback), a case running past `TIME_LIMIT` seconds
(`Hang`), or a silent loss. Mutations: truncation, random bytes, deleted / repeated spans, non-UTF-8 bytes, a byte
order mark, NUL, empty files, very long lines; and on the parsed structure: missing and extra fields, wrong types,
huge / negative / NaN / infinite numbers, empty and very long strings, lone surrogates, duplicate keys, deep
nesting.

Cases per reader: `CI_CASES` with a fixed seed per reader, or `COMPCLIP_FUZZ_CASES=N` (and another seed with
`COMPCLIP_FUZZ_SEED=S`) for a longer run;
`COMPCLIP_FUZZ_RECORD=file.json` records the cases tried and their outcomes per reader
(`bench/fuzz_readers.py` runs the suite that way and writes `bench/results/fuzz-*.json`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import threading
import time
import zlib
from collections import Counter
from typing import Any, Callable, List

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

CI_CASES = 100
"""Cases per reader in CI (each a few milliseconds: the whole suite takes about 13 s on one core)."""
TIME_LIMIT = float(os.environ.get("COMPCLIP_FUZZ_TIME_LIMIT", "10"))
"""Seconds one case may take before it counts as a hang."""
LONG_LINE = 2_000_000
"""Characters of the "very long line" mutation (spaCy's default max_length is 1,000,000)."""


def cases(ci: int = CI_CASES) -> int:
    return int(os.environ.get("COMPCLIP_FUZZ_CASES", "0")) or ci


def fuzz_settings(ci: int = CI_CASES) -> settings:
    """Hypothesis settings of a fuzz test: no example database, no deadline (the time bound is ours, and it
    interrupts); the seed comes from `fuzz_seed`."""
    return settings(max_examples=cases(ci), deadline=None, database=None, suppress_health_check=list(HealthCheck),
                    print_blob=True)


def fuzz_seed(reader: str) -> int:
    """The fixed seed of a reader's cases (its name), varied by COMPCLIP_FUZZ_SEED for another long run."""
    return zlib.crc32(reader.encode()) ^ int(os.environ.get("COMPCLIP_FUZZ_SEED", "0"))


def fuzz_reader(reader: str, strategy, path: str, read: Callable[[], Any],
                check: Callable[[Any, tuple], str | None] | None = None, *, line_format: bool = False,
                ci: int = CI_CASES, refusal: str = "error") -> None:
    """Run one reader's cases: each draws a mutation `(kinds, bytes, ...)` from `strategy`, writes the bytes to
    `path` and runs `read()` under the time bound (`run_case` checks a refusal, recorded as `refusal`); an
    accepted value goes to `check(value, mutation)`, which asserts that nothing was lost and may name the outcome
    (e.g. "skipped")."""
    with tally(reader) as counts:
        @fuzz_settings(ci)
        @seed(fuzz_seed(reader))
        @given(strategy)
        def case(mutation):
            kinds, data = mutation[0], mutation[1]
            with open(path, "wb") as handle:
                handle.write(data)
            outcome = run_case(read, path, line_format=line_format)
            label = refusal if outcome.kind == "error" else outcome.kind
            if outcome.kind == "accepted" and check is not None:
                label = check(outcome.value, mutation) or label
            counts.add(label, kinds)

        case()


# ---- time bound and outcome ----------------------------------------------------------------------------------------

class Hang(BaseException):
    """A case ran past TIME_LIMIT (a BaseException, so no reader's broad `except Exception` can swallow it)."""


@contextlib.contextmanager
def time_bound(seconds: float = TIME_LIMIT):
    """Interrupt the block with `Hang` after `seconds` (SIGALRM; main thread only, elsewhere unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def input_errors() -> tuple:
    """The exception types a reader may raise on bad input (each names its file)."""
    import pickle

    from compclip.data.inputs import InputError

    return (InputError, pickle.UnpicklingError)


class Outcome:
    def __init__(self, kind: str, value: Any = None, error: BaseException | None = None):
        self.kind, self.value, self.error = kind, value, error

    def __repr__(self):
        return f"Outcome({self.kind}, {self.error!r})"


def run_case(call: Callable[[], Any], path: str, *, line_format: bool = False) -> Outcome:
    """Run one reader call under the time bound. A project input error must name `path` (and `path:LINE` for
    line formats); any other exception propagates and fails the test with its traceback."""
    try:
        with time_bound():
            value = call()
    except input_errors() as error:
        check_names_file(str(error), path, line_format)
        return Outcome("error", error=error)
    return Outcome("accepted", value)


def check_names_file(message: str, path: str, line_format: bool = False) -> None:
    assert path in message, f"the error does not name the file {path}: {message}"
    if line_format and not message.startswith(path + ":"):
        return  # a whole-file error (not found, empty, unreadable) is about no line
    if line_format:
        assert re.match(re.escape(path) + r":\d+: ", message), f"the error does not name the line: {message}"


# ---- table mutations (CSV / TSV) -------------------------------------------------------------------------------------

TABLE_KINDS = ("drop_cell", "add_cell", "blank_cell", "junk_cell", "long_cell", "list_garbage", "number_cell",
               "repeat_header", "drop_header_column", "repeat_row", "climbing_path", "quoted_newline")
LIST_GARBAGE = ["['a', ", "[1, 2]", "{'a': 1}", "[" * 300 + "]" * 300, "['\\ud800']", "[None]", "nan", "inf",
                "[[['x']]]", "('a', 'b')", "[True, 2]", "[" + "9" * 5000 + "]", "b'bytes'", "{[]: 1}", "[1e999]"]
JUNK = ["\"", "'", "\t", "a\tb", "\\", "=1+1", "null", "[]", "{}", "../x.png", "/etc/passwd", " ", "\u2028", "é"]


@st.composite
def mutated_table(draw, rows, delimiter, image_column):
    """(kinds, bytes) of a CSV/TSV table after 1-3 cell-level mutations and, sometimes, a byte mutation."""
    rows = [list(row) for row in rows]
    kinds = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(TABLE_KINDS))
        kinds.append(kind)
        line = draw(st.integers(1, len(rows) - 1)) if len(rows) > 1 else 0
        row = rows[line]
        column = draw(st.integers(0, max(len(row) - 1, 0)))
        if kind == "drop_cell" and row:
            del row[column]
        elif kind == "add_cell":
            row.insert(column, draw(st.sampled_from(JUNK)))
        elif kind == "blank_cell" and row:
            row[column] = ""
        elif kind == "junk_cell" and row:
            row[column] = draw(st.sampled_from(JUNK))
        elif kind == "long_cell" and row:
            row[column] = "w" * draw(st.sampled_from([200_000, LONG_LINE]))
        elif kind == "list_garbage" and row:
            row[column] = draw(st.sampled_from(LIST_GARBAGE))
        elif kind == "number_cell" and row:
            row[column] = draw(st.sampled_from(["-1", "1e999", "NaN", "-inf", "9" * 400, "0x10"]))
        elif kind == "repeat_header":
            rows[0].append(draw(st.sampled_from(rows[0])))
        elif kind == "drop_header_column" and rows[0]:
            del rows[0][draw(st.integers(0, len(rows[0]) - 1))]
        elif kind == "repeat_row":
            rows.insert(line, list(row))
        elif kind == "climbing_path" and image_column < len(row):
            row[image_column] = draw(st.sampled_from(["../outside.png", "images/../../x.png", "../../etc/passwd"]))
        elif kind == "quoted_newline" and row:
            row[column] = row[column] + "\nnext line"
    out = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    csv.writer(out, delimiter=delimiter, lineterminator="\n", quoting=quoting).writerows(rows)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        kind, data = draw(byte_mutation(data))
        kinds.append(kind)
    return kinds, data


# ---- independent counts of samples ---------------------------------------------------------------------------------

KARPATHY_TRAIN = ("train", "restval")


def expected_samples(kind: str, data: bytes) -> int:
    """The samples of an accepted file of `kind` (a manifest format or a JSON release format), counted with the
    standard parsers and without the project's readers: what an accepting reader must have kept."""
    text = data.decode("utf-8-sig")
    if kind == "jsonl":
        return sum(1 for line in text.split("\n") if line.strip())
    if kind in ("csv", "tsv", "negclip"):
        delimiter = "," if kind == "csv" else "\t"
        return sum(1 for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row) - 1
    value = json.loads(text)
    if kind == "degla":
        return 1 if isinstance(value, dict) and "original" in value else len(value)
    if kind == "coco":
        return len(value["annotations"])
    if kind == "karpathy":
        return sum(len(image["sentences"]) for image in value["images"] if image.get("split") in KARPATHY_TRAIN)
    raise ValueError(kind)


# ---- the record of a run -------------------------------------------------------------------------------------------

class Tally:
    """Outcomes and mutation kinds of one reader's cases; written to COMPCLIP_FUZZ_RECORD when set."""

    def __init__(self, reader: str):
        self.reader, self.outcomes, self.mutations, self.started = reader, Counter(), Counter(), time.time()

    def add(self, outcome: str, mutations: List[str]) -> None:
        self.outcomes[outcome] += 1
        self.mutations.update(mutations)

    def write(self) -> None:
        path = os.environ.get("COMPCLIP_FUZZ_RECORD")
        if not path:
            return
        record = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        entry = record.setdefault("readers", {}).setdefault(self.reader, {"cases": 0, "outcomes": {},
                                                                          "mutations": {}, "seconds": 0.0})
        entry["cases"] += sum(self.outcomes.values())
        for key, counter in (("outcomes", self.outcomes), ("mutations", self.mutations)):
            for name, count in counter.items():
                entry[key][name] = entry[key].get(name, 0) + count
        entry["seconds"] = round(entry["seconds"] + time.time() - self.started, 2)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


@contextlib.contextmanager
def tally(reader: str):
    counts = Tally(reader)
    yield counts
    counts.write()


# ---- byte mutations ------------------------------------------------------------------------------------------------

BYTE_KINDS = ("truncate", "flip", "insert_random", "delete_span", "repeat_span", "non_utf8", "bom", "nul",
              "long_line", "empty")


@st.composite
def byte_mutation(draw, data: bytes, kinds=BYTE_KINDS) -> tuple[str, bytes]:
    """(kind, mutated bytes) of one byte-level mutation of `data`."""
    kind = draw(st.sampled_from(kinds))
    size = len(data)
    at = draw(st.integers(0, size))
    if kind == "truncate":
        return kind, data[:draw(st.integers(0, max(size - 1, 0)))]
    if kind == "flip":
        if not size:
            return kind, data
        positions = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4))
        out = bytearray(data)
        for position in positions:
            out[position] = draw(st.integers(0, 255))
        return kind, bytes(out)
    if kind == "insert_random":
        return kind, data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if kind == "delete_span":
        return kind, data[:at] + data[at + draw(st.integers(1, 64)):]
    if kind == "repeat_span":
        end = min(size, at + draw(st.integers(1, 200)))
        return kind, data[:end] + data[at:end] + data[end:]
    if kind == "non_utf8":
        return kind, data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])) \
            + data[at:]
    if kind == "bom":
        return kind, b"\xef\xbb\xbf" + data
    if kind == "nul":
        return kind, data[:at] + b"\x00" + data[at:]
    if kind == "long_line":
        return kind, data[:at] + draw(st.sampled_from([b"a", b" ", b"[", b'"'])) * LONG_LINE + data[at:]
    return kind, b""


# ---- structure mutations (JSON-like values) --------------------------------------------------------------------------

STRUCT_KINDS = ("drop_field", "extra_field", "wrong_type", "null", "huge_number", "huge_integer", "negative",
                "nan", "infinity", "empty_string", "long_string", "lone_surrogate", "duplicate_key", "deep_nesting",
                "empty_container", "climbing_path")
RAW = "\u0000raw{}\u0000"
"""A placeholder string whose JSON text is replaced by raw JSON after dumping (numbers and nesting that
`json.dumps` cannot write, duplicate keys)."""


def _paths(value, prefix=()) -> List[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, prefix + (index,))
    return out


def _get(value, path):
    for step in path:
        value = value[step]
    return value


def _set(value, path, new):
    if not path:
        return new
    _get(value, path[:-1])[path[-1]] = new
    return value


class JsonDocument:
    """A mutable JSON value plus the raw texts its placeholders stand for."""

    def __init__(self, value):
        self.value = json.loads(json.dumps(value))
        self.raw: List[str] = []

    def placeholder(self, text: str) -> str:
        self.raw.append(text)
        return RAW.format(len(self.raw) - 1)

    def _replace(self, text: str) -> str:
        for number, raw in enumerate(self.raw):
            text = text.replace(json.dumps(RAW.format(number)), raw)
        return text

    def dumps(self, **options) -> str:
        return self._replace(json.dumps(self.value, **options))

    def dumps_lines(self) -> str:
        """JSONL: one line per element of a list value (the value itself on one line otherwise)."""
        rows = self.value if isinstance(self.value, list) else [self.value]
        return "".join(self._replace(json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)

    def python(self):
        """The value with every placeholder made a Python object (for pickles): raw numbers parsed, surrogates
        kept, deep nesting at a depth pickle can still write; a repeated key cannot exist in a dict."""
        def convert(value):
            if isinstance(value, str) and value.startswith("\u0000raw"):
                raw = self.raw[int(value.strip("\u0000")[3:])]
                if raw.startswith("["):
                    nested: list = []
                    for _ in range(200):
                        nested = [nested]
                    return nested
                if raw.startswith('"'):
                    return json.loads(raw)
                if raw.isdigit():  # int("9" * 5000) itself is refused by Python's digit limit
                    return 10 ** len(raw) - 1
                return float(raw)
            if isinstance(value, dict):
                return {convert(key) if not key.startswith("\u0000raw") else key + "?": convert(item)
                        for key, item in value.items()}
            if isinstance(value, list):
                return [convert(item) for item in value]
            return value

        return convert(self.value)


@st.composite
def struct_mutation(draw, document: JsonDocument, kinds=STRUCT_KINDS) -> str:
    """Apply one structure mutation to `document` in place; returns its kind."""
    kind = draw(st.sampled_from(kinds))
    paths = _paths(document.value)
    path = draw(st.sampled_from(paths))
    target = _get(document.value, path)
    containers = [p for p in paths if isinstance(_get(document.value, p), dict)]
    if kind == "drop_field":
        dicts = [p for p in containers if _get(document.value, p)]
        if dicts:
            where = draw(st.sampled_from(dicts))
            obj = _get(document.value, where)
            del obj[draw(st.sampled_from(sorted(obj)))]
        return kind
    if kind == "extra_field":
        if containers:
            obj = _get(document.value, draw(st.sampled_from(containers)))
            value = draw(st.sampled_from([1, "x", [1, 2], {"a": None}, None, "surrogate"]))
            obj[draw(st.sampled_from(["extra", "notes", "image ", "__proto__"]))] = (
                document.placeholder('"\\udcff"') if value == "surrogate" else value)
        return kind
    if kind == "duplicate_key":
        dicts = [p for p in containers if _get(document.value, p)]
        if dicts:
            obj = _get(document.value, draw(st.sampled_from(dicts)))
            key = draw(st.sampled_from(sorted(obj)))
            obj[document.placeholder(json.dumps(key))] = draw(st.sampled_from(["other", 7, None]))
        return kind
    replacements = {
        "wrong_type": lambda: draw(st.sampled_from([7, 2.5, True, "text", [], {}, ["a", 1], {"k": "v"}])),
        "null": lambda: None,
        "huge_number": lambda: document.placeholder(draw(st.sampled_from(["1e999", "-1e999", "1e308", "1.5e-400"]))),
        "huge_integer": lambda: document.placeholder("9" * draw(st.sampled_from([20, 400, 5000]))),
        "negative": lambda: draw(st.sampled_from([-1, -10**12, -0.5])),
        "nan": lambda: math.nan,
        "infinity": lambda: draw(st.sampled_from([math.inf, -math.inf])),
        "empty_string": lambda: "",
        "long_string": lambda: "w" * draw(st.sampled_from([10_000, LONG_LINE])),
        "lone_surrogate": lambda: document.placeholder(draw(st.sampled_from(['"\\ud800"', '"a\\udcff b"']))),
        "deep_nesting": lambda: document.placeholder("[" * 100_000 + "]" * 100_000),
        "empty_container": lambda: draw(st.sampled_from([[], {}])),
        "climbing_path": lambda: draw(st.sampled_from(["../outside.png", "a/../../x.jpg", "../../etc/passwd"])),
    }
    if kind == "negative" and not isinstance(target, (int, float)):
        kind = "wrong_type"
    document.value = _set(document.value, path, replacements[kind]())
    return kind


@st.composite
def mutated_json(draw, value, extra_bytes: bool = True, as_lines: bool = False) -> tuple[List[str], bytes]:
    """(mutation kinds, bytes) of a JSON value (written as JSONL, one line per element, with `as_lines`) after
    1-3 structure mutations and, sometimes, a byte mutation."""
    document = JsonDocument(value)
    kinds = [draw(struct_mutation(document)) for _ in range(draw(st.integers(1, 3)))]
    text = document.dumps_lines() if as_lines else document.dumps(ensure_ascii=False,
                                                                   indent=draw(st.sampled_from([None, 1])))
    data = text.encode("utf-8", "surrogatepass")
    if extra_bytes and draw(st.booleans()):
        kind, data = draw(byte_mutation(data))
        kinds.append(kind)
    return kinds, data
