"""Checked reading of files the project did not write: text lines, JSON, numbers, image paths and images.

Every reader of a manifest, a published release format or a benchmark file goes through these functions, so a
malformed file ends in one `InputError` whose message starts with the file and says where (`file:line`, or the
item and the field) and what is wrong, never in a traceback from inside `json`, `csv` or PIL. The policies they
implement are listed in docs/reliability.md ("Bad input"):

- text is UTF-8 (a leading byte-order mark is allowed); a byte that is not names its line and column;
- JSON objects may not repeat a key (`json` would keep the last silently and lose an item or a field); numbers
  beyond what Python parses, and nesting deeper than it can recurse, are errors, not crashes;
- text that reaches a tokenizer must be encodable as UTF-8 (a JSON escape such as `"\\ud800"` is not);
- a relative image path must stay inside the folder it resolves against (absolute paths are taken as written;
  symbolic links are followed, which is how image folders are usually placed);
- an image is opened only when it is a regular file, and decoded only when its size is below PIL's
  decompression-bomb limit and its aspect ratio below `MAX_ASPECT_RATIO`.
"""
from __future__ import annotations

import codecs
import json
import math
import numbers
import os
import stat
import warnings
from typing import Any, Callable, Iterator


class InputError(ValueError):
    """A malformed input file or item; the message starts with the file and names the line or item and field."""


ErrorType = Callable[[str], Exception]


# ---- files and text ----------------------------------------------------------------------------------------------

def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for messages that quote user data of any length."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_regular_file(path: str, error: ErrorType = InputError) -> None:
    """Raise `error` unless `path` (symbolic links followed) is a regular file: a folder, a FIFO (whose `open`
    would block forever) or a device is not an input file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, ValueError) as failure:
        raise error(f"{path}: cannot read ({failure})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file")


def _undecodable(path: str, line: int, raw: bytes, failure: UnicodeDecodeError) -> str:
    column = failure.start - (raw.rfind(b"\n", 0, failure.start) + 1) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{raw[failure.start]:02x} at column {column})"


def text_lines(path: str, error: ErrorType = InputError) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of a UTF-8 text file, read line by line."""
    check_regular_file(path, error)
    try:
        handle = open(path, "rb")
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as failure:
                raise error(_undecodable(path, number, raw, failure)) from None


def read_text(path: str, error: ErrorType = InputError) -> str:
    """The whole UTF-8 text of a file (a leading byte-order mark dropped)."""
    check_regular_file(path, error)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as failure:
        raise error(_undecodable(path, raw.count(b"\n", 0, failure.start) + 1, raw, failure)) from None


def check_text(value: str, field: str) -> str:
    """`value` unchanged, or a ValueError naming `field` when it cannot be written as UTF-8 (a lone surrogate from
    a JSON escape: the tokenizer and the JSONL writer would fail on it later, mid-run)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as failure:
        raise ValueError(f"field {field!r} is not valid Unicode text ({value[failure.start]!r} at character "
                         f"{failure.start})") from None
    return value


# ---- JSON --------------------------------------------------------------------------------------------------------

class _Duplicates:
    """object_pairs_hook that builds dicts at C speed and remembers the first object that repeats a key."""

    def __init__(self):
        self.found: tuple[dict, str] | None = None

    def __call__(self, pairs: list) -> dict:
        built = dict(pairs)
        if len(built) != len(pairs) and self.found is None:
            seen: set = set()
            key = next(key for key, _ in pairs if key in seen or seen.add(key))
            self.found = (built, key)
        return built


def _pointer(value: Any, target: dict, prefix: str = "") -> str | None:
    """JSON pointer of the object `target` (by identity) inside `value`."""
    if value is target:
        return prefix or "/"
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if isinstance(child, (dict, list)):
            found = _pointer(child, target, f"{prefix}/{key}")
            if found is not None:
                return found
    return None


def parse_json(text: str, where: str, error: ErrorType = InputError, *, whole_file: bool = True) -> Any:
    """`text` parsed as JSON; `where` is the file, or `file:line` for one JSONL row (`whole_file=False`).

    Errors name the line and column (`file:line: ... (column c)`), a repeated key with the JSON pointer of its
    object, and numbers or nesting that Python's parser refuses."""
    duplicates = _Duplicates()
    try:
        value = json.loads(text, object_pairs_hook=duplicates)
    except json.JSONDecodeError as failure:
        place = f"{where}:{failure.lineno}" if whole_file else where
        raise error(f"{place}: invalid JSON (column {failure.colno}): {failure.msg}") from None
    except RecursionError:
        raise error(f"{where}: invalid JSON: nested too deeply to parse") from None
    except ValueError as failure:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise error(f"{where}: invalid JSON: {failure}") from None
    if duplicates.found is not None:
        obj, key = duplicates.found
        pointer = _pointer(value, obj)
        raise error(f"{where}: duplicate key {key!r} in the object at {pointer} (JSON keeps only the last)")
    return value


def load_json(path: str, error: ErrorType = InputError) -> Any:
    """A JSON file, read and parsed with the checks of `read_text` and `parse_json`."""
    return parse_json(read_text(path, error), path, error)


# ---- numbers -----------------------------------------------------------------------------------------------------

def whole_number(value: Any, field: str) -> int:
    """A non-negative integer id from an int, a numpy integer, an integral float or a string of digits; a
    ValueError naming `field` otherwise (NaN, infinities, negatives, fractions, booleans, other types)."""
    if isinstance(value, bool):
        raise ValueError(f"field {field!r} must be a non-negative integer, got {value!r}")
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) < 4300:
        return int(value.strip())  # (Python's int() refuses longer digit strings)
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        number = int(value)
    else:
        raise ValueError(f"field {field!r} must be a non-negative integer, got {shown(value, 40)}")
    if number < 0:
        raise ValueError(f"field {field!r} must be a non-negative integer, got {number}")
    return number


def finite_number(value: Any, field: str, minimum: float | None = None) -> float:
    """A finite real number (not a boolean), at least `minimum`; a ValueError naming `field` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"field {field!r} must be a finite number, got {shown(value, 40)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"field {field!r} must be a finite number, got {shown(value, 40)}")
    if minimum is not None and number < minimum:
        raise ValueError(f"field {field!r} must be at least {minimum}, got {number}")
    return number


# ---- image paths -------------------------------------------------------------------------------------------------

def resolve_under(root: str, name: str, field: str = "image") -> str:
    """The path of image `name`: an absolute path (or URL) as written, a relative one joined to `root`.

    A relative path that climbs out of `root` (`../..`) is refused with a ValueError naming `field`: the folder
    it resolves against is the user's statement of where the images are, and such a row is a mistake or an
    attempt to read other files. Symbolic links inside `root` are followed."""
    if "\x00" in name:
        raise ValueError(f"field {field!r} holds a NUL character")
    path = os.path.expanduser(name)
    if os.path.isabs(path) or "://" in path:
        return path
    if os.path.normpath(path).split(os.sep)[0] == os.pardir:
        raise ValueError(f"field {field!r}: {shown(name)} climbs out of the image root {root or '.'} (give an absolute "
                         "path, or set the image root to a folder that holds it)")
    return os.path.join(root, path)


# ---- images ------------------------------------------------------------------------------------------------------

MAX_ASPECT_RATIO = 500
"""Longest side / shortest side beyond which an image is refused. open_clip's preprocessing scales the shortest
side to the model's input size, so a 1 x 60,000 strip (a few hundred bytes as a PNG) would become a 224 x 13.4M
image: several GB, a decompression bomb by another route. 500 keeps the scaled image below PIL's own limit
(`PIL.Image.MAX_IMAGE_PIXELS`, 89.5M pixels) up to 384-pixel inputs; real photographs and panoramas are far
below it."""


class UnusableImage(InputError):
    """An image that cannot be used; the message starts with its path."""


def open_image(source, name: str = ""):
    """The image `source` (a file path, or a binary file object called `name`) as an RGB `PIL.Image`, or an
    `UnusableImage` saying why not: not a regular file, not an image PIL can decode, truncated, more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS`, or a longer side more than `MAX_ASPECT_RATIO` times its shorter one.

    Size and shape are checked from the header, before any pixel is decoded. PIL reports broken files with many
    exception types (OSError, SyntaxError, struct.error, IndexError, ...), so every failure of opening or
    decoding is this image's problem; what the caller's preprocessing does with the result is not caught here."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        check_regular_file(name, UnusableImage)
    name = name or "<image bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with its size
            with Image.open(source) as image:
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit and width * height > limit:
                    raise UnusableImage(f"{name}: {width}x{height} = {width * height} pixels, more than the "
                                        f"decompression-bomb limit of {limit}")
                if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    raise UnusableImage(f"{name}: {width}x{height}, an aspect ratio beyond 1:{MAX_ASPECT_RATIO}")
                return image.convert("RGB")
    except UnusableImage:
        raise
    except Exception as failure:  # noqa: BLE001 - see the docstring: PIL's failures on bad bytes share no type
        raise UnusableImage(f"{name}: not a readable image ({type(failure).__name__}: {failure})") from None
