"""Fuzz of the configuration loader: YAML files and command-line values through `compclip.config.request` and
`compclip.resolve.resolve`, generated from the schema (every key, values of every type, NaN/inf, huge and negative
numbers, very long strings, unknown keys, duplicate keys) and by mutating the bundled configs (truncation, random
and non-UTF-8 bytes, duplicated and deleted lines, empty files, very long lines), plus special files (a FIFO,
/dev/zero, a folder, a symlink loop) where a file is named.

Every case ends one of two ways, within a time bound: accepted, with every value it gave kept and no number NaN,
infinite or negative (nothing dropped silently: a YAML that repeats a key is never accepted, since one of the two
values would be lost), or one ConfigError that names the file or the key. Anything else (another exception, a hang)
fails the test, and Hypothesis shrinks it to the smallest case. The engine is the readers' (tests/fuzz_support.py):
a fixed seed per reader and a bounded number of cases in CI, `COMPCLIP_FUZZ_CASES=N` for a longer run,
`COMPCLIP_FUZZ_RECORD=file.json` for the record of cases per reader (bench/fuzz_readers.py).

The paths of data and evaluation files get only missing paths here: what their readers do with a file's content is
fuzzed with the readers (tests/data, tests/evaluation).
"""
import math
import os
import re
import typing
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
import fuzz_support as fz  # noqa: E402
from hypothesis import given, seed, strategies as st  # noqa: E402

from compclip.config import ConfigError, _field_type, bundled_configs, config_path, field_docs, request  # noqa: E402
from compclip.resolve import resolve  # noqa: E402

KEYS = [dotted for dotted, _, _, _ in field_docs()]
TOP_LEVEL = [key for key in KEYS if "." not in key]
# Fields naming data or evaluation files (fuzzed with their readers) or a checkpoint (tests/trainer): missing paths.
DATA_PATHS = re.compile(r"^(data\.(train_manifest|val_manifest|image_root)|eval\.(?!batch_size|num_workers|max_items|"
                        r"precision|progress|sugarcrepe_subsets|aro_|valse_pieces|zeroshot_dataset|retrieval_split|"
                        r"spacy_model|zeroshot_templates).*|resume|init_from|model\.pretrained)$")
MISSING_PATHS = st.sampled_from(["", "", "", "", "missing.jsonl", "no/such/folder/", "/nonexistent/" + "x" * 300])
SPECIAL = ("fifo", "/dev/zero", "folder", "loop", "non-utf8", "empty", "comment only", "nul bytes")


def _names_a_key(message: str, *extra: str) -> bool:
    """The message names a configuration key (a dotted key of the schema, or its section and its field: "data.synthetic:
    max_objects must be ...", or a top-level key) or one of `extra`."""
    def named(key: str) -> bool:
        section, _, name = key.rpartition(".")
        return key in message or bool(section) and section in message and re.search(rf"\b{name}\b", message)

    sections = {key.rsplit(".", 1)[0] for key in KEYS if "." in key}
    return any(named(key) for key in KEYS if "." in key) or any(message.startswith(f"{section}:") for section in
                                                                sections) or any(
        re.search(rf"\b{re.escape(key)}\b", message) for key in TOP_LEVEL) or "unknown config key" in message or any(
        item and item in message for item in extra)


# --------------------------------------------------------------------------------------------------------------
# Values

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6),
    st.sampled_from([0, -1, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 30, -10 ** 30, 10 ** 400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=20), st.sampled_from(["x" * 20_000, "{seed}", "{}", "{0}", "{nope}", "a/b", "\x00", "é" * 50]))
ANYTHING = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(min_size=1, max_size=8), inner, max_size=3), max_leaves=6)


def _typed(tp):
    """Values of type `tp` (valid or close to it) mixed with values of any type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        base = st.booleans()
    elif tp is int:
        base = st.integers(-3, 300) | st.sampled_from([2 ** 63, -2 ** 63, 10 ** 30])
    elif tp is float:
        base = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 2)
    elif tp is str:
        base = st.text(max_size=30) | st.sampled_from(["{seed}", "{nope}", "{0}", "{", "}", "%s", "x\x00y", "",
                                                      "~", "..", "/", "a" * 5000])
    elif origin in (list, typing.List):
        base = st.lists(_typed(args[0]) if args else ANYTHING, max_size=4)
    elif origin in (dict, typing.Dict):
        base = st.dictionaries(st.text(min_size=1, max_size=10), _typed(args[1]) if args else ANYTHING, max_size=3)
    else:
        base = ANYTHING
    return st.one_of(base, base, base, ANYTHING)  # mostly the field's type, so that cases get past the type check


def values_for(key: str):
    if DATA_PATHS.match(key):
        return MISSING_PATHS
    return _typed(_field_type(key)[0])


KNOWN_ENTRY = st.sampled_from(KEYS).flatmap(lambda key: st.tuples(st.just(key), values_for(key)))
ENTRIES = st.lists(st.one_of(
    KNOWN_ENTRY, KNOWN_ENTRY, KNOWN_ENTRY,
    st.tuples(st.sampled_from(["unknown", "optim.unknown", "data.synthetic.nope", "model.arch.deeper", "Optim.lr"]),
              ANYTHING)), min_size=1, max_size=4, unique_by=lambda entry: entry[0])


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text[:-len("\n...\n")] if text.endswith("\n...\n") else text.rstrip("\n")


def render(entries, grouped: bool) -> str:
    """YAML text of (dotted key, value) entries, nested by section: each section once, holding its keys in order
    (`grouped`), or one block per entry, repeating sections; a key given twice stays repeated in the text."""
    if not grouped:
        return "".join(_block(dotted.split(".")[:-1], [(dotted.split(".")[-1], value)]) for dotted, value in entries)
    tree: dict = {}
    for dotted, value in entries:
        *sections, name = dotted.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(("section", section), {})
        node.setdefault(("leaves", None), []).append((name, value))
    return _tree_text(tree, 0)


def _tree_text(tree: dict, depth: int) -> str:
    lines = []
    for (kind, name), content in tree.items():
        if kind == "leaves":
            lines += [f"{'  ' * depth}{leaf}: {_flow(value)}\n" for leaf, value in content]
        else:
            lines.append(f"{'  ' * depth}{name}:\n" + _tree_text(content, depth + 1))
    return "".join(lines)


def _block(sections, items) -> str:
    lines = [f"{'  ' * depth}{section}:" for depth, section in enumerate(sections)]
    lines += [f"{'  ' * len(sections)}{name}: {_flow(value)}" for name, value in items]
    return "\n".join(lines) + "\n"


def duplicate_keys(text: str):
    """The keys repeated within one mapping of the YAML `text`, from its node graph (independent of the loader)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    found, todo = [], [root]
    while todo:
        node = todo.pop()
        if isinstance(node, yaml.MappingNode):
            keys = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
            found += sorted({key for key in keys if keys.count(key) > 1})
            todo += [value for _, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
    return found


def _expected(tp, value):
    """`value` as a field of type `tp` holds it when given as-is (None: no simple expectation, e.g. a union)."""
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, bool) and type(value) is tp:
        return value
    return None


def _numbers(config, prefix=""):
    """(dotted key, value) of every int and float field of a config, recursively (not bools)."""
    import dataclasses

    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{field.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{field.name}", value
        elif isinstance(value, list) and all(isinstance(v, float) for v in value):
            yield from ((f"{prefix}{field.name}[{i}]", v) for i, v in enumerate(value))


def _sane(config) -> None:
    """No accepted number is NaN, infinite or negative: every numeric key of the schema is a count, a size, a
    rate, a seed or a period, and none of them has a meaning below 0."""
    for key, value in _numbers(config):
        assert math.isfinite(value) and value >= 0, (key, value)


def _kept(config, entries) -> None:
    """Nothing dropped: every value given for a known key is in the accepted config."""
    _sane(config)
    last = dict(entries)
    for dotted, value in last.items():
        if dotted not in KEYS:
            continue
        tp = _field_type(dotted)[0]
        wanted = _expected(tp, value)
        if wanted is None:
            continue
        held = config
        for part in dotted.split("."):
            held = getattr(held, part)
        assert held == wanted or (isinstance(wanted, float) and math.isnan(wanted) and math.isnan(held)), (
            dotted, value, held)


def _run(counts, kinds, argv, *names, world_size: int = 1):
    """request(argv) then resolve() under the time bound; the outcome ('accepted' or 'error') added to `counts`
    (a fuzz_support.Tally) with the mutation `kinds`."""
    try:
        with fz.time_bound():
            asked = request(argv)
            resolve(asked.config, world_size)
    except ConfigError as error:
        assert _names_a_key(str(error), *names), f"{argv!r}: {error}"
        counts.add("error", kinds)
        return None
    counts.add("accepted", kinds)
    return asked


def fuzz_case(reader: str, ci: int):
    """The decorators of one reader's Hypothesis case: the suite's settings and the reader's fixed seed."""
    def decorate(case):
        return fz.fuzz_settings(ci)(seed(fz.fuzz_seed(reader))(case))
    return decorate


# --------------------------------------------------------------------------------------------------------------
# The tests


def test_yaml_files_generated_from_the_schema(tmp_path):
    reader = "config: YAML file (from the schema)"

    @fuzz_case(reader, ci=60)
    @given(entries=ENTRIES, grouped=st.sampled_from([True, True, True, False]),
           repeat=st.sampled_from([None, None, None, 1.0, "again"]), world_size=st.sampled_from([1, 2, 3, 8]))
    def case(entries, grouped, repeat, world_size):
        entries = entries + ([(entries[0][0], repeat)] if repeat is not None else [])  # a key given twice
        text = render(entries, grouped)
        path = tmp_path / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        asked = _run(counts, ["repeated key"] if repeat is not None else ["schema"], ["--config", str(path)],
                     str(path), world_size=world_size)
        repeated = duplicate_keys(text)
        assert asked is None or not repeated, f"accepted a YAML that repeats {repeated}: one value is lost\n{text}"
        if asked is not None:
            _kept(asked.config, entries)

    with fz.tally(reader) as counts:
        case()


def _mutate(text: bytes, how: str, at: float, blob: bytes) -> bytes:
    position = int(at * len(text))
    lines = text.splitlines(keepends=True) or [b""]
    line = min(int(at * len(lines)), len(lines) - 1)
    return {
        "truncate": lambda: text[:position],
        "flip": lambda: text[:position] + bytes([text[position] ^ 0xFF]) + text[position + 1:] if text else text,
        "insert": lambda: text[:position] + blob + text[position:],
        "duplicate line": lambda: b"".join(lines[:line + 1] + [lines[line]] + lines[line + 1:]),
        "delete line": lambda: b"".join(lines[:line] + lines[line + 1:]),
        "long line": lambda: text + b"\nlog:\n  name: " + b"n" * 1_000_000 + b"\n",
        "empty": lambda: b"",
    }[how]()


def test_mutated_bundled_configs(tmp_path):
    names, reader = bundled_configs(), "config: mutated bundled YAML"

    @fuzz_case(reader, ci=60)
    @given(name=st.sampled_from(names), how=st.sampled_from(["truncate", "flip", "insert", "duplicate line",
                                                               "delete line", "long line", "empty"]),
           at=st.floats(0, 1, exclude_max=True), blob=st.binary(min_size=1, max_size=12) | st.sampled_from(
               [b"\xff\xfe", b"\x00", b"\xc3", b"\n  - ]", b"{", b"&a *a", b"!!python/object:os.system"]))
    def case(name, how, at, blob):
        original = Path(config_path(name)).read_bytes()
        mutated = _mutate(original, how, at, blob)
        path = tmp_path / "mutated.yaml"
        path.write_bytes(mutated)
        # no data and no weights to find: a case is refused for what the mutation did, not for a missing dataset
        asked = _run(counts, [how], ["--config", str(path), "--data.train_manifest=", "--model.pretrained="],
                     str(path))
        try:
            repeated = duplicate_keys(mutated.decode("utf-8"))
        except UnicodeDecodeError:
            repeated = []
        assert asked is None or not repeated, f"accepted {name} {how} with repeated {repeated}: one value is lost"

    with fz.tally(reader) as counts:
        case()


SCHEMA_TOKENS = st.sampled_from(KEYS).flatmap(lambda key: st.tuples(st.just(key), values_for(key).map(
    lambda v: v if isinstance(v, str) else _flow(v))))
TOKENS = st.one_of(
    SCHEMA_TOKENS, SCHEMA_TOKENS, SCHEMA_TOKENS,
    st.tuples(st.sampled_from(KEYS), st.sampled_from(
        ["nan", ".nan", ".inf", "-.inf", "1e999", "9" * 400, "-9" * 200, "[", "{a: ", "~", "null",
         "!!python/object/apply:os.system [ls]", os.fsdecode(b"\xff\xfe"), "x" * 20_000])),
    st.tuples(st.sampled_from(["", ".", "a..b", "optim.", ".lr", "optim.lr.x", "config", "plan", "plan-world-size",
                               "local_rank", "Optim.lr", "loss.terms.", "loss.terms.x.y"]), st.text(max_size=12)))


def test_command_line_values():
    reader = "config: command line"

    @fuzz_case(reader, ci=80)
    @given(tokens=st.lists(TOKENS, min_size=1, max_size=3), spaced=st.booleans(),
           stray=st.sampled_from([None, None, None, "positional", "-x", "--"]), world_size=st.sampled_from([1, 2, 8]))
    def case(tokens, spaced, stray, world_size):
        argv = []
        for key, raw in tokens:
            argv += [f"--{key}", raw] if spaced and raw and not raw.startswith("--") else [f"--{key}={raw}"]
        argv += [stray] if stray else []
        asked = _run(counts, ["stray argument"] if stray else ["tokens"], argv, *[key for key, _ in tokens], *(
            [stray] if stray else []), world_size=world_size)
        if asked is not None:
            _kept(asked.config, [(key, yaml.safe_load(raw)) for key, raw in tokens if key in KEYS and _loads(raw)])

    with fz.tally(reader) as counts:
        case()


HOSTILE = ("nan", "-.inf", "-1", "99999999999999999999999", "1e999", "", "~", "[]", "{}", "{nope}", "x" * 10_000,
           "\x00", "/dev/zero", os.fsdecode(b"\xff"))


def test_every_key_with_every_kind_of_bad_value():
    """A sweep, not a sample: each key of the schema on the command line with each HOSTILE value (NaN, infinity,
    negative, beyond 64 bits, empty, null, a list, a mapping, a format placeholder, 10,000 characters, a NUL byte,
    a device, non-UTF-8)."""
    with fz.tally("config: every key x hostile values (command line)") as counts:
        for key in KEYS:
            for raw in HOSTILE if not DATA_PATHS.match(key) else ("", "missing.jsonl", "x" * 10_000, "\x00"):
                asked = _run(counts, [repr(raw[:12])], [f"--{key}={raw}"], key)
                if asked is not None and _loads(raw):
                    _kept(asked.config, [(key, yaml.safe_load(raw))])


def _loads(raw: str) -> bool:
    try:
        yaml.safe_load(raw)
        return True
    except yaml.YAMLError:
        return False


def _special(kind: str, tmp_path: Path) -> str:
    """A path of the `kind` of SPECIAL: something that is not a config file a reader could take as one."""
    path = tmp_path / kind.replace(" ", "_")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        return "/dev/zero"
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        os.symlink(path, path)
    elif kind == "non-utf8":
        path.write_bytes(b"optim:\n  lr: \xff\xfe\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "comment only":
        path.write_bytes(b"# optim:\n#   lr: 1\n")
    else:
        path.write_bytes(b"optim:\n  lr: 1\x00\n")
    return str(path)


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("flag", ["--config", "--deepspeed.config_file"])
def test_special_files_named_as_configs(tmp_path, flag, kind):
    """A FIFO or /dev/zero would block or never end a read: every kind is refused, naming the file."""
    path = _special(kind, tmp_path)
    argv = [flag, path] if flag == "--config" else [f"{flag}={path}"]
    with fz.tally(f"config: special file as {flag}") as counts:
        assert _run(counts, [kind], argv, path) is None
