"""The layout of a run folder, and finding things in it without a process group (the checks before ranks start,
the evaluation CLI, the study and the trainer all read it the same way).

    <log.logs>/<log.name>/
      config.yaml                 the resolved configuration (every derived value filled in)
      config.requested.yaml       what the command line and YAMLs asked for; `--resume` compares against it
      deepspeed_config.json       the generated DeepSpeed config
      out.log  metrics.jsonl  tensorboard/  curves.png  eval/<label>/
      checkpoints/
        epoch_<N>.pt              open_clip exports
        deepspeed/
          step<N>/                a checkpoint ("tag"); complete once compclip_complete.json is in it
          compclip_latest         the tag of the last commit (DeepSpeed's `latest` too)
          compclip_line.json      the current line of descent, once a run has started a new one
          abandoned/line<L>/      the tags that the start of line L left behind (log.keep_abandoned)

Lineage. Every completion marker records its tag's `id`, its `parent` (the tag the run continued from: the previous
commit of the same process, or the tag it resumed from) and its `line`. A run that resumes the newest tag of the
current line continues that line; one that resumes any other tag, or starts afresh in a folder that holds tags,
starts line L+1: `compclip_line.json` records it (with its start tag) before anything moves, then the tags not on
the new line are moved under `abandoned/line<L+1>/` or deleted. `--resume latest` and retention follow the current
line only: its newest complete tag (the start tag while the line has committed nothing), then parent by parent. A
kill between the line record and the moves leaves abandoned tags in place, and they are still passed over: their
markers name another line.

The commit protocol that writes a tag and the start of a line are `compclip.trainer.checkpoint`'s; this module only
reads (and verifies).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from compclip import durable

logger = logging.getLogger("compclip")

MARKER = "compclip_complete.json"  # in a tag: written last, by rank 0, once every rank's pieces are on disk
POINTER = "compclip_latest"  # next to the tags: the tag of the last commit (DeepSpeed's `latest` too)
EXTRAS = "compclip_rank{rank}.pt"  # per rank, in a tag: RNG state, method/teacher state, data position
LINE = "compclip_line.json"  # next to the tags: {"line": L, "start": tag path or null}, the current line of descent
ABANDONED = "abandoned"  # next to the tags: abandoned/line<L>/<tag>, the tags the start of line L left behind
TAG = re.compile(r"step(\d+)")
TRASH = ".deleting-"  # a tag being deleted is renamed to this prefix first
EXPORT = re.compile(r"epoch_(\d+)\.pt")


class CheckpointNotFound(FileNotFoundError):
    """No usable checkpoint where one was asked for (the message says why and what is there)."""


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def requested(self) -> Path:
        return self.root / "config.requested.yaml"

    @property
    def deepspeed_config(self) -> Path:
        return self.root / "deepspeed_config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def deepspeed(self) -> Path:
        return self.root / "checkpoints" / "deepspeed"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def exports(self) -> List[Tuple[int, Path]]:
        """[(epoch, path)] of the open_clip exports `epoch_N.pt`, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := EXPORT.fullmatch(p.name)))

    def latest_export(self) -> Path:
        found = self.exports()
        if not found:
            raise FileNotFoundError(f"{self.root}: no checkpoints/epoch_N.pt in this run folder")
        return found[-1][1]


def run_folder_of(checkpoint: str) -> Optional[RunFolder]:
    """The run folder a checkpoint path (`<run>/checkpoints/deepspeed[/<tag>]`) lies in, or None."""
    try:
        parts = Path(checkpoint).resolve().parts
    except (OSError, ValueError):  # a NUL byte, a name too long, a symlink loop: not a checkpoint path
        return None
    if "checkpoints" not in parts:
        return None
    index = len(parts) - 1 - parts[::-1].index("checkpoints")
    return RunFolder(Path(*parts[:index]))


# --------------------------------------------------------------------------------------------------------------
# Tags and their markers


def tags(root: Path) -> List[Tuple[int, str]]:
    """[(step, name)] of the tags in a DeepSpeed checkpoint folder, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := TAG.fullmatch(p.name))]
    return sorted(found)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


MAX_RECORD_BYTES = 64 << 20
"""Markers, line records and pointers are kilobytes (a marker of 1,000 ranks: ~200 KB); anything larger is
damage, refused unread."""


def _small_file(path: Path, what: str) -> bytes:
    """The bytes of a marker, line record or pointer; CheckpointNotFound naming the file for anything that is not
    a regular file of at most MAX_RECORD_BYTES (a FIFO or a device would block or never end a read)."""
    try:
        return durable.read_bounded(path, MAX_RECORD_BYTES)
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise CheckpointNotFound(f"{path}: unreadable {what} ({getattr(error, 'strerror', None) or error})") from None


def _json_object(path: Path, what: str) -> Dict[str, Any]:
    """The JSON object in `path`; CheckpointNotFound naming the file for anything else."""
    try:
        loaded = json.loads(_small_file(path, what).decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointNotFound(f"{path}: unreadable {what} ({str(error)[:200]})") from None
    if not isinstance(loaded, dict):
        raise CheckpointNotFound(f"{path}: the {what} is not a JSON object")
    return loaded


def marker(tag_dir: Path) -> Dict[str, Any]:
    """The completion marker of a tag (`{}` when it has none: incomplete, or written before markers); raises
    CheckpointNotFound naming the file when it is unreadable or not a JSON object."""
    path = tag_dir / MARKER
    if not path.is_file():
        return {}
    return _json_object(path, "completion marker")


def _usable_marker(tag_dir: Path, warn: bool) -> Optional[Dict[str, Any]]:
    """The marker of a complete tag, None for an incomplete one; an unreadable marker counts as incomplete, with a
    warning (latest and retention pass over it, an explicit resume of it is refused by `checked`)."""
    if not is_complete(tag_dir):
        return None
    try:
        return marker(tag_dir)
    except CheckpointNotFound as error:
        if warn:
            logger.warning("resume: skipping %s: %s", tag_dir, error)
        return None


def legacy(root: Path) -> bool:
    """A folder written before completion markers: DeepSpeed's `latest` and no marker in any tag."""
    return (root / "latest").is_file() and not any(is_complete(root / name) for _, name in tags(root))


def _number(value: Any, default: int = 0) -> int:
    """An int field of a marker or line record, `default` for anything else (a hand-edited or damaged file)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# --------------------------------------------------------------------------------------------------------------
# Lines of descent


@dataclass(frozen=True)
class Line:
    """The current line of descent of a checkpoint folder: its number and its start tag (None: the folder's first
    line, or a run that started afresh)."""

    number: int
    start: Optional[Path]


def current_line(root: Path) -> Line:
    """The line `compclip_line.json` records (line 0, no start, when there is none)."""
    path = root / LINE
    if not os.path.lexists(path):
        return Line(0, None)
    try:
        record = _json_object(path, "line record")
    except CheckpointNotFound as error:
        raise CheckpointNotFound(f"{error}; it is rewritten when a run starts a new line: resume a tag "
                                 "explicitly") from None
    if not isinstance(record.get("start"), (str, type(None))) or "\x00" in (record.get("start") or ""):
        raise CheckpointNotFound(f"{path}: not a line record ({{\"line\": L, \"start\": tag path or null}}); resume "
                                 "a tag explicitly")
    start = record.get("start")
    return Line(_number(record.get("line")), None if start is None else root / start)


def same_tag(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def line_of(found: Dict[str, Any]) -> int:
    """The line a marker records (0 for a marker from before lineage)."""
    return _number(found.get("line"))


def parent(root: Path, tag_dir: Path, found: Dict[str, Any], complete: List[Tuple[int, str, Dict[str, Any]]]
           ) -> Optional[Path]:
    """The tag `tag_dir` (marker `found`) continued from, when it is a complete tag of `root`. `complete`: the
    complete tags of `root`, oldest first. A marker from before lineage continues the newest older complete tag
    that has none either (a folder of such tags is one line)."""
    if "parent" not in found:
        step = _step_of(tag_dir)
        older = [name for s, name, m in complete if step is not None and s < step and "parent" not in m]
        return root / older[-1] if older else None
    wanted = found["parent"]
    if not isinstance(wanted, dict) or not isinstance(wanted.get("tag"), str):
        return None
    for _, name, candidate in complete:
        if name == wanted["tag"] and candidate.get("id") == wanted.get("id"):
            return root / name
    return None  # deleted by retention, abandoned, or a tag of that name from another line


def _step_of(tag_dir: Path) -> Optional[int]:
    match = TAG.fullmatch(tag_dir.name)
    return int(match.group(1)) if match else None


def complete_tags(root: Path, warn: bool = False) -> List[Tuple[int, str, Dict[str, Any]]]:
    """[(step, name, marker)] of the complete tags of `root`, oldest first (unreadable markers passed over)."""
    out = []
    for step, name in tags(root):
        found = _usable_marker(root / name, warn)
        if found is not None:
            out.append((step, name, found))
    return out


def ancestry(root: Path, tag_dir: Path, complete: Optional[List] = None) -> List[Path]:
    """`tag_dir` and the complete tags of `root` it descends from, newest first."""
    complete = complete_tags(root) if complete is None else complete
    chain, seen = [tag_dir], {tag_dir.name}
    found = _usable_marker(tag_dir, warn=False)
    while found is not None:
        up = parent(root, chain[-1], found, complete)
        if up is None or up.name in seen:
            break
        chain.append(up)
        seen.add(up.name)
        found = next(m for _, name, m in complete if name == up.name)
    return chain


def chain(root: Path, warn: bool = False) -> List[Path]:
    """The complete tags of the current line of `root`, newest first: its newest tag (the line's start while the
    line has committed none), then parent by parent. Empty when there is none."""
    line = current_line(root)
    complete = complete_tags(root, warn)
    heads = [root / name for _, name, found in complete if line_of(found) == line.number]
    if heads:
        return ancestry(root, heads[-1], complete)
    if line.start is not None and _usable_marker(line.start, warn) is not None:
        # a start outside `root` (a resumed abandoned tag) has its ancestors in its own folder
        return ancestry(line.start.parent, line.start, complete if line.start.parent == root else None)
    return []


def newest_complete(root: Path, warn: bool = True) -> str:
    """The newest tag of the current line of `root` (a path relative to `root` when the line starts outside it),
    warning about each newer incomplete one it skips (DeepSpeed's `latest` in a folder written before markers)."""
    return str(_relative(root, candidates_in(root, warn)[0]))


def _relative(root: Path, tag_dir: Path) -> Path:
    try:
        return tag_dir.relative_to(root)
    except ValueError:
        return tag_dir


def candidates_in(root: Path, warn: bool = True) -> List[Path]:
    """The tags a resume of the folder `root` tries, in order: the current line's newest complete tag, then its
    ancestors (the fallbacks when a tag fails verification)."""
    if legacy(root):
        if warn:
            logger.warning("%s has no completion markers (written by an older compclip): trusting DeepSpeed's "
                           "`latest`", root)
        return [_legacy_pointer(root)]
    found = chain(root, warn)
    if not found:
        incomplete = [name for _, name in tags(root) if not is_complete(root / name)]
        raise CheckpointNotFound(f"resume: no complete checkpoint in {root} on its current line (incomplete, "
                                 f"interrupted saves: {', '.join(incomplete) or 'none'})")
    if warn:
        for incomplete in newer_incomplete(root, found[0].name):
            logger.warning("resume: skipping %s: incomplete (its save was interrupted before the commit); using "
                           "%s", root / incomplete, found[0])
        head_step, line = _step_of(found[0]), current_line(root).number
        for step, name, other in complete_tags(root):
            if head_step is not None and step > head_step and root / name not in found:
                logger.warning("resume: skipping %s: on line %d, not on the current line %d (a resume of an older "
                               "tag left it behind); using %s", root / name, line_of(other), line, found[0])
    return found


def _legacy_pointer(root: Path) -> Path:
    """The tag DeepSpeed's `latest` names: a folder directly in `root`, else CheckpointNotFound naming the file."""
    path = root / "latest"
    name = _small_file(path, "DeepSpeed pointer").decode("utf-8", errors="replace").strip()
    try:
        usable = name not in ("", ".", "..") and "/" not in name and "\x00" not in name and (root / name).is_dir()
    except OSError:  # a name longer than the file system takes
        usable = False
    if not usable:
        raise CheckpointNotFound(f"{path}: names {name[:200]!r}, not a checkpoint folder in {root}")
    return root / name


def newer_incomplete(root: Path, tag: str) -> List[str]:
    """The incomplete tags of `root` newer than `tag` (interrupted saves a resume of `tag` passes over)."""
    step = next((s for s, name in tags(root) if name == tag), None)
    if step is None or legacy(root):
        return []
    return [name for s, name in tags(root) if s > step and not is_complete(root / name)]


def checked(root: Path, tag: str) -> Tuple[Path, str]:
    """(root, tag) when `root/tag` is a complete checkpoint, else CheckpointNotFound saying why."""
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise CheckpointNotFound(f"resume: {tag_dir}: no such checkpoint")
    if not is_complete(tag_dir) and not legacy(root):
        complete = [name for _, name in tags(root) if is_complete(root / name)]
        raise CheckpointNotFound(f"resume: {tag_dir} is incomplete: its save was interrupted before the commit "
                                 f"(no {MARKER}); complete checkpoints there: {', '.join(complete) or 'none'}")
    marker(tag_dir)  # unreadable: refused, naming the file
    return root, tag


def candidates(spec: str, run: Optional[RunFolder] = None, warn: bool = True) -> List[Tuple[Path, str]]:
    """[(DeepSpeed checkpoint folder, tag)] a resume of `spec` tries, in order: for `latest` (the run's checkpoint
    folder) or a checkpoint folder, the newest complete tag of its current line and then its ancestors; for a tag
    folder, that tag alone (checked to be complete)."""
    try:
        return _candidates(spec, run, warn)
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in a path; OSError: too long, a loop, ...
        if isinstance(error, CheckpointNotFound):
            raise
        raise CheckpointNotFound(f"resume: {spec[:200]!r}: {getattr(error, 'strerror', None) or error}") from None


def _candidates(spec: str, run: Optional[RunFolder], warn: bool) -> List[Tuple[Path, str]]:
    if spec == "latest":
        if run is None:
            raise CheckpointNotFound("resume=latest needs the run folder (log.name)")
        if not tags(run.deepspeed):
            raise CheckpointNotFound(f"resume=latest: no checkpoint in {run.deepspeed}")
        return [(found.parent, found.name) for found in candidates_in(run.deepspeed, warn)]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointNotFound(f"resume: {spec} is not a DeepSpeed checkpoint folder or tag")
    if tags(path) or (path / "latest").is_file():
        return [(found.parent, found.name) for found in candidates_in(path, warn)]
    if not (TAG.fullmatch(path.name) or is_complete(path) or any(path.glob("*_model_states.pt"))):
        raise CheckpointNotFound(f"resume: {spec} is not a DeepSpeed checkpoint folder or tag (no tags step<N>, no "
                                 f"{MARKER}, no DeepSpeed states in it)")
    return [checked(path.parent, path.name)]


def locate(spec: str, run: Optional[RunFolder] = None, warn: bool = True) -> Tuple[Path, str]:
    """(DeepSpeed checkpoint folder, tag) of `latest` (the newest complete tag of the current line of `run`), a
    checkpoint folder (the same of that folder) or a tag folder; the tag is checked to be complete."""
    return candidates(spec, run, warn)[0]


# --------------------------------------------------------------------------------------------------------------
# Verification


def recorded_files(tag_dir: Path, found: Dict[str, Any]) -> List[Tuple[str, Optional[Dict[str, Any]]]]:
    """[(relative path, {"size", "crc32"} or None)] of the files a marker records, sorted (None: a marker from
    before checksums, which lists names only; a malformed record is returned as it is, for `verify` to report)."""
    files = found.get("files")
    if isinstance(files, dict):
        return sorted((str(name), record) for name, record in files.items())
    if isinstance(files, list):
        return sorted((str(name), None) for name in files)
    return []


def verify_file(tag_dir: Path, name: str, record: Any) -> Optional[str]:
    """What is wrong with file `name` of `tag_dir` against its marker record (None: it matches)."""
    shown = name if len(name) <= 200 else f"{name[:200]}... ({len(name)} characters)"
    path, where = tag_dir / name, f"{tag_dir / shown}"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"{tag_dir / MARKER}: names a file outside the tag ({shown!r})"
    size_wanted, crc_wanted = (record.get("size"), record.get(durable.CHECKSUM)) if isinstance(record, dict) else (
        None, None)
    if record is not None and not (_number(size_wanted, -1) >= 0 and isinstance(crc_wanted, str)):
        return f"{tag_dir / MARKER}: malformed record of {shown!r} ({str(record)[:80]})"
    try:
        size, crc = durable.checksum(path)
    except FileNotFoundError:
        return f"{where}: missing"
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
        return f"{where}: unreadable ({getattr(error, 'strerror', None) or str(error)[:200]})"
    if record is None:  # a marker from before checksums: the file is there, and that is all it says
        return None
    if size != size_wanted:
        return (f"{where}: {size} bytes, the completion marker records {size_wanted} "
                f"({'truncated' if size < size_wanted else 'grown'})")
    if crc != crc_wanted:
        return f"{where}: corrupt ({durable.CHECKSUM} {crc}, the completion marker records {crc_wanted})"
    return None


def verify(tag_dir: Path, share: Tuple[int, int] = (0, 1)) -> List[str]:
    """The problems of the files the completion marker of `tag_dir` records: missing, truncated, corrupt, or a
    marker that is unreadable or records no file. With `share` = (rank, ranks), only every ranks-th file from
    `rank` on (the ranks of a resume divide the reading; compclip.trainer.checkpoint.Checkpointer.verified)."""
    try:
        found = marker(tag_dir)
    except CheckpointNotFound as error:
        return [str(error)]
    if not found:
        return [] if legacy(tag_dir.parent) else [f"{tag_dir / MARKER}: missing (an incomplete checkpoint)"]
    files = recorded_files(tag_dir, found)
    if not files:
        return [f"{tag_dir / MARKER}: records no file (\"files\" is {str(found.get('files'))[:80]})"]
    rank, ranks = share
    problems = [verify_file(tag_dir, name, record) for name, record in files[rank::ranks]]
    return [problem for problem in problems if problem is not None]
