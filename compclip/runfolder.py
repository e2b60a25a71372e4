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

The commit protocol that writes a tag is `compclip.trainer.checkpoint`'s; this module only reads.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger("compclip")

MARKER = "compclip_complete.json"  # in a tag: written last, by rank 0, once every rank's pieces are on disk
POINTER = "compclip_latest"  # next to the tags: the tag of the last commit (DeepSpeed's `latest` too)
EXTRAS = "compclip_rank{rank}.pt"  # per rank, in a tag: RNG state, method/teacher state, data position
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
    parts = Path(checkpoint).resolve().parts
    if "checkpoints" not in parts:
        return None
    index = len(parts) - 1 - parts[::-1].index("checkpoints")
    return RunFolder(Path(*parts[:index]))


# --------------------------------------------------------------------------------------------------------------
# Tags


def tags(root: Path) -> List[Tuple[int, str]]:
    """[(step, name)] of the tags in a DeepSpeed checkpoint folder, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := TAG.fullmatch(p.name))]
    return sorted(found)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def marker(tag_dir: Path) -> Dict[str, Any]:
    """The completion marker of a tag (`{}` for a tag written before markers)."""
    path = tag_dir / MARKER
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointNotFound(f"{path}: unreadable completion marker ({error})") from None


def legacy(root: Path) -> bool:
    """A folder written before completion markers: DeepSpeed's `latest` and no marker in any tag."""
    return (root / "latest").is_file() and not any(is_complete(root / name) for _, name in tags(root))


def newest_complete(root: Path, warn: bool = True) -> str:
    """The newest tag of `root` with a completion marker, warning about each newer incomplete one it skips
    (DeepSpeed's `latest` in a folder written before markers)."""
    if legacy(root):
        if warn:
            logger.warning("%s has no completion markers (written by an older compclip): trusting DeepSpeed's "
                           "`latest`", root)
        return (root / "latest").read_text().strip()
    skipped = []
    for _, name in reversed(tags(root)):
        if is_complete(root / name):
            for incomplete in skipped if warn else ():
                logger.warning("resume: skipping %s: incomplete (its save was interrupted before the commit); using "
                               "%s", root / incomplete, root / name)
            return name
        skipped.append(name)
    raise CheckpointNotFound(f"resume: no complete checkpoint in {root} (incomplete, interrupted saves: "
                             f"{', '.join(skipped) or 'none'})")


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
    return root, tag


def locate(spec: str, run: Optional[RunFolder] = None, warn: bool = True) -> Tuple[Path, str]:
    """(DeepSpeed checkpoint folder, tag) of `latest` (the newest complete tag of `run`), a checkpoint folder (its
    newest complete tag) or a tag folder; the tag is checked to be complete."""
    if spec == "latest":
        if run is None:
            raise CheckpointNotFound("resume=latest needs the run folder (log.name)")
        if not tags(run.deepspeed):
            raise CheckpointNotFound(f"resume=latest: no checkpoint in {run.deepspeed}")
        return run.deepspeed, newest_complete(run.deepspeed, warn)
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointNotFound(f"resume: {spec} is not a DeepSpeed checkpoint folder or tag")
    if tags(path) or (path / "latest").is_file():
        return path, newest_complete(path, warn)
    return checked(path.parent, path.name)
