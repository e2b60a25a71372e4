"""Training checkpoints: save (an atomic, durable commit), resume (bit-identical continuation), init-from (weights
from any number of ranks), retention, the open_clip export, and a tag's consolidated fp32 weights under any ZeRO
stage (`consolidated_fp32`: init-from and `compclip-export` read them). Finding a tag in a run folder is
`compclip.runfolder`'s (it needs no process group, so the checks before ranks start use it too).

Layout of one checkpoint, `<run>/checkpoints/deepspeed/step<N>/` (a "tag"):

* DeepSpeed's own files (`engine.save_checkpoint`): module, optimizer and schedule state, sharded as the run's
  ZeRO stage shards them, plus the client state `{"compclip": {epoch, micro_in_epoch, global_step, world_size,
  config}}`.
* `compclip_rank<r>.pt` per rank: what DeepSpeed does not know: the RNG state (python, numpy, torch, cuda), the
  method's state (CE-CLIP's threshold), the EMA teacher's local storage (this rank's ZeRO-3 shard; under ZeRO
  0/1/2, where every rank holds the same full tensors, rank 0's file alone holds them and a resume sends them to the
  other ranks), the non-finite counter, and the rank's data position (`loader.state_dict()`: skip count, streams).
* `compclip_complete.json` (rank 0, last): the completion marker, with every file of the tag and its size and
  CRC-32 (compclip.durable.checksum), the world size, the tag's lineage (`id`, `parent`, `line`: compclip.runfolder)
  and the run's requested configuration (what `--resume` restores and compares against). A tag without it is
  incomplete: its save was interrupted, and nothing resumes from it.

The commit is atomic under a kill at any instant and durable under a power loss. Rank 0 first clears what an
interrupted save of the same tag left, then every rank writes its pieces (DeepSpeed's states without DeepSpeed's
`latest` pointer, recorded as DeepSpeed's checkpoint engine writes them; then its extras through a temporary name,
an fsync and a rename: compclip.durable), fsyncs each file it wrote and checksums it from the page cache, and sends
the records to rank 0. Rank 0 adds any file of the tag no rank reported (fsynced and checksummed by itself), fsyncs
the tag's folders, writes the marker, and only then the pointers next to the tags: `compclip_latest` and
DeepSpeed's `latest` (kept for DeepSpeed's own tools), each replaced atomically. With `log.keep_checkpoints = N`,
rank 0 then deletes the tags of the current line older than its newest N complete ones (renamed out of the way
first, so a kill during the deletion leaves no half-deleted tag under a tag's name). `compclip.trainer.faults`
kills a save at each of these stages for the tests.

Resume. `compclip.runfolder` lists the tags a resume tries (the newest complete tag of the current line, then its
ancestors; an explicit tag alone) before any process group exists. `Checkpointer.verified` then checks them with
every rank: each rank checksums its share of a tag's files, the verdicts are all-gathered, and every rank takes
the first tag that passes, so they all take the same one; an explicit tag that fails is refused. Once the state is
loaded, `begin_line` makes the resumed tag the head of the current line: when it was not (an older tag, or a
fallback from a damaged one) a new line starts, and the tags it leaves behind are moved under `abandoned/` or
deleted (`log.keep_abandoned`).

Resume needs the same world size (the shards and data positions are per rank); `init_from` consolidates the fp32
weights (and the teacher's shards) of a checkpoint written by any number of ranks, and starts optimizer,
schedule and data order fresh.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from compclip import durable, runfolder
from compclip.config import ConfigError, dump_yaml, to_dict
from compclip.rng import rng_state, set_rng_state
from compclip.runfolder import (ABANDONED, EXTRAS, LINE, MARKER, POINTER, TRASH, RunFolder, newer_incomplete,
                                tags)
from compclip.safe_pickle import rng_state_from_safe, rng_state_to_safe
from compclip.trainer import faults

logger = logging.getLogger("compclip")


# --------------------------------------------------------------------------------------------------------------
# Resume point


@dataclass
class ResumePoint:
    """Where a resumed run continues: counters, and the RNG state / data position of the save."""

    epoch: int
    micro_in_epoch: int
    global_step: int
    rng: Optional[Dict[str, Any]]
    data: Optional[Dict[str, Any]]

    def loader_position(self, epoch: int, batch: int) -> Dict[str, Any]:
        """The loader state that starts at micro-batch `batch` of `epoch`: the saved one when it is there."""
        data = self.data
        if data is not None and int(data.get("epoch", -1)) == epoch and int(data.get("batch", -1)) == batch:
            return data
        logger.warning("checkpoint without this rank's data position: the count of skipped samples restarts at 0 "
                       "for the rest of epoch %d", epoch)
        return {"epoch": epoch, "batch": batch}

    def restore_rng(self) -> None:
        """Once: the generators as they were at the save."""
        if self.rng is not None:
            set_rng_state(self.rng)
            self.rng = None


def epoch_batches(loader, epoch: int, start: int, point: Optional[ResumePoint]):
    """(index, batch) from micro-batch `start` of `epoch` (the loader is at the epoch's start when `start` = 0).

    A resumed run's first epoch starts at the first micro-batch not yet trained on: the ones before it are neither
    loaded nor decoded, the rest come in the straight run's order with its negative draws, and the generators are
    restored where the straight run had them: before the loader's iterator when the save was at an epoch end (the
    straight run drew nothing since, not even the loader's seed), after it otherwise (the save followed the last
    finished step, i.e. the loading of this batch's predecessors; an augmentation drawing from the global
    generator then draws as in the straight run)."""
    if point is not None and start > 0:
        loader.load_state_dict(point.loader_position(epoch, start))
    elif point is not None:
        point.restore_rng()
    batches = iter(loader)  # draws the DataLoader's base seed, as at the straight run's epoch start
    if point is not None:
        point.restore_rng()
    return enumerate(batches, start=start)


# --------------------------------------------------------------------------------------------------------------
# The checkpointer


class Checkpointer:
    """DeepSpeed checkpoints of one run folder, for one rank. `keep` / `keep_exports`: how many complete tags of the
    current line / exports `epoch_N.pt` to keep (0 = all); `keep_abandoned`: move the tags a new line leaves behind
    under `abandoned/` (True) or delete them."""

    def __init__(self, run: RunFolder, rank: int, world_size: int, keep: int = 0, keep_exports: int = 0,
                 keep_abandoned: bool = True):
        self.run, self.rank, self.world_size = run, rank, world_size
        self.keep, self.keep_exports, self.keep_abandoned = keep, keep_exports, keep_abandoned
        self.saved_step = -1  # the step of the last checkpoint saved or resumed from
        self.dir = run.checkpoints  # exports (epoch_N.pt) live here too
        self.ds_dir = run.deepspeed
        self.line, self.parent = 0, None  # of the next commit (rank 0 writes markers): set by begin_line
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()

    def write_run_files(self, resolved) -> None:
        """`config.yaml` (the resolved configuration), `config.requested.yaml` (what was asked) and
        `deepspeed_config.json` in the run folder (rank 0)."""
        if self.rank == 0:
            durable.write_text(self.run.config, dump_yaml(resolved.config))
            durable.write_text(self.run.requested, dump_yaml(resolved.requested))
            durable.write_text(self.run.deepspeed_config, json.dumps(resolved.deepspeed, indent=1))

    def save(self, engine, step: int, counters: Dict[str, int], configs: Dict[str, Any],
             extras: Dict[str, Any], rng: Optional[Dict[str, Any]] = None) -> Path:
        """Tag `step<step>`: DeepSpeed's state + counters + the resolved config, this rank's `extras` (+ RNG state:
        `rng`, default the generators' current one), committed atomically and durably (module docstring); then the
        retention of `keep`. `configs`: {"config": resolved, "request": requested} as mappings; the request goes
        into the completion marker, where `--resume` reads it before any process group exists."""
        tag = f"step{step}"
        tag_dir = self.ds_dir / tag
        client = {"compclip": {**counters, "world_size": self.world_size, "config": configs["config"]}}
        if self.rank == 0 and tag_dir.exists():  # an interrupted save of this tag: no stale file may stay in it
            _delete(tag_dir)
        torch.distributed.barrier()
        faults.save_stage("before_states", step)
        with _recording_writes(engine) as written:
            engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=client, save_latest=False)
        faults.save_stage("after_states", step)
        extras_path = tag_dir / EXTRAS.format(rank=self.rank)
        durable.torch_save({"rng": rng_state_to_safe(rng if rng is not None else rng_state()), **extras, **counters},
                           extras_path)
        records = _fsynced_records(tag_dir, [*written, extras_path])
        faults.save_stage("after_extras", step)
        gathered = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(records, gathered, dst=0)  # every rank's pieces are on disk
        if self.rank == 0:
            self._commit(tag_dir, step, gathered, configs["request"])
        torch.distributed.barrier()
        self.saved_step = step
        logger.info("saved DeepSpeed checkpoint %s", tag_dir)
        return tag_dir

    def _commit(self, tag_dir: Path, step: int, gathered: Sequence[Dict[str, Dict[str, Any]]],
                request: Dict[str, Any]) -> None:
        """Rank 0: the completion marker of `tag_dir`, then the pointers, then the retention."""
        files: Dict[str, Dict[str, Any]] = {}
        for records in gathered:
            files.update(records)
        unreported = [path for path in _files_below(tag_dir) if path.relative_to(tag_dir).as_posix() not in files]
        files.update(_fsynced_records(tag_dir, unreported))  # written outside the checkpoint engine (NVMe offload)
        durable.fsync_tree(tag_dir)
        durable.fsync_dir(self.ds_dir)
        identity = os.urandom(8).hex()
        durable.write_text(tag_dir / MARKER, json.dumps({
            "tag": tag_dir.name, "global_step": step, "world_size": self.world_size, "checksum": durable.CHECKSUM,
            "files": dict(sorted(files.items())), "id": identity, "parent": self.parent, "line": self.line,
            "request": request}, indent=1))
        faults.save_stage("after_marker", step)
        self._point_to(tag_dir.name)
        faults.save_stage("after_pointer", step)
        self.parent = {"tag": tag_dir.name, "id": identity}
        self.prune()

    def _point_to(self, tag: Optional[str]) -> None:
        """Rank 0: `compclip_latest` and DeepSpeed's `latest` name `tag` (None: removed)."""
        for name in (POINTER, "latest"):
            if tag is None:
                (self.ds_dir / name).unlink(missing_ok=True)
            else:
                durable.write_text(self.ds_dir / name, tag)

    def prune(self) -> None:
        """Rank 0, after a commit: delete the tags of the current line older than its newest `keep` complete ones
        (none when keep = 0), the incomplete tags older than those, and what an interrupted deletion left. Tags of
        other lines are not counted and not touched here (`begin_line` deals with them)."""
        for leftover in self.ds_dir.glob(TRASH + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        line = [tag_dir for tag_dir in runfolder.chain(self.ds_dir) if tag_dir.parent == self.ds_dir]
        if not self.keep or len(line) <= self.keep:
            return
        oldest_kept = _step(line[self.keep - 1])
        older = {tag_dir.name for tag_dir in line[self.keep:]}
        older |= {name for step, name in tags(self.ds_dir) if step < oldest_kept
                  and not runfolder.is_complete(self.ds_dir / name)}
        for name in sorted(older):
            _delete(self.ds_dir / name)
            logger.info("log.keep_checkpoints=%d: deleted %s", self.keep, self.ds_dir / name)

    # ---- resume: verification and the line of descent ---------------------------------------------------------
    def verified(self, located: Sequence[Tuple[Path, str]], key: str = "resume") -> Tuple[Path, str]:
        """The first tag of `located` (compclip.runfolder.candidates) whose files match its completion marker
        (`first_intact`). Collective: rank 0's list is the one tried, each rank checks its share of a tag's files
        and every rank sees every verdict, so all ranks take the same tag; rank 0 logs the fallbacks."""
        holder = [list(located)]
        torch.distributed.broadcast_object_list(holder, src=0)

        def problems(tag_dir: Path) -> List[str]:
            mine = runfolder.verify(tag_dir, (self.rank, self.world_size))
            everyone: List[Optional[List[str]]] = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, mine)
            return sorted({problem for share in everyone for problem in share})

        return first_intact(holder[0], problems, key, warn=self.rank == 0)

    def begin_line(self, resumed: Optional[Tuple[Path, str]]) -> None:
        """Make `resumed` (None: a fresh run) the head of the current line, before the run commits anything.
        Collective; rank 0 acts. Resuming the line's newest tag continues the line. Anything else starts line
        L+1: its record (compclip.runfolder.LINE) is written first, then every complete tag of the folder that is
        not `resumed` or one of its ancestors is moved under `abandoned/line<L+1>/` or deleted
        (`keep_abandoned`). The same sweep finishes what a kill left of an earlier start."""
        if self.rank == 0:
            self._begin_line(None if resumed is None else Path(resumed[0]) / resumed[1])
        torch.distributed.barrier()

    def _begin_line(self, resumed: Optional[Path]) -> None:
        line, head = runfolder.current_line(self.ds_dir), runfolder.chain(self.ds_dir)
        continues = resumed is not None and bool(head) and runfolder.same_tag(head[0], resumed)
        if not runfolder.complete_tags(self.ds_dir):
            continues = True  # nothing here to leave behind (a fresh folder, or a resume of another run's tag)
        self.line = line.number
        if resumed is not None:
            self.parent = {"tag": resumed.name, "id": runfolder.marker(resumed).get("id")}
        if not continues:
            self.line = max([line.number] + _abandoned_lines(self.ds_dir)) + 1
            start = None if resumed is None else _relative_to(resumed, self.ds_dir)
            self.ds_dir.mkdir(parents=True, exist_ok=True)
            durable.write_text(self.ds_dir / LINE, json.dumps({"line": self.line, "start": start}))
            logger.warning("%s: line %d of this run starts at %s; --resume latest and retention follow it",
                           self.ds_dir, self.line, resumed if resumed is not None else "a fresh start")
            self._point_to(resumed.name if resumed is not None and resumed.parent == self.ds_dir else None)
        kept = {tag_dir.name for tag_dir in runfolder.ancestry(resumed.parent, resumed)
                if tag_dir.parent == self.ds_dir} if resumed is not None else set()
        for _, name, found in runfolder.complete_tags(self.ds_dir):
            if name not in kept and runfolder.line_of(found) != self.line:
                self._abandon(name)

    def _abandon(self, name: str) -> None:
        source = self.ds_dir / name
        if not self.keep_abandoned:
            _delete(source)
            logger.warning("log.keep_abandoned=false: deleted %s (not on the current line)", source)
            return
        target = self.ds_dir / ABANDONED / f"line{self.line}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        durable.fsync_dir(target.parent), durable.fsync_dir(self.ds_dir)
        logger.warning("moved %s to %s: not on the current line (log.keep_abandoned=true keeps it; "
                       "--resume %s starts a line from it)", source, target, target)

    def save_training(self, engine, counters: Dict[str, int], resolved, stateful: Dict[str, Any],
                      values: Dict[str, Any], rng: Optional[Dict[str, Any]] = None) -> Path:
        """`save` of a training run: `stateful` objects (method, teacher, data loader; None allowed) are stored by
        their `state_dict()` under their names, `values` as they are, `rng` as the generators' state (default:
        their current one); see `restore_training`."""
        extras = {name: obj.state_dict() if obj is not None else None for name, obj in stateful.items()}
        configs = {"config": to_dict(resolved.config), "request": to_dict(resolved.requested)}
        return self.save(engine, counters["global_step"], counters, configs, {**extras, **values}, rng)

    def restore_training(self, engine, located: Tuple[Path, str],
                         stateful: Dict[str, Any]) -> Tuple[ResumePoint, Dict[str, Any]]:
        """`resume`, then `load_state_dict` of every `stateful` object (None skipped) from its saved state. The
        data loader is not among them: its position is restored at its epoch (`epoch_batches`)."""
        point, extras = self.resume(engine, located)
        self.saved_step = point.global_step  # an epoch end right at the resume point saves nothing new
        for name, obj in stateful.items():
            if obj is not None:
                if extras.get(name) is None:
                    raise ConfigError(f"resume: {Path(located[0]) / located[1]}: no saved state of the {name} "
                                      f"(field {name!r} of {EXTRAS.format(rank=self.rank)}): written by another run")
                obj.load_state_dict(extras[name])
        return point, extras

    def export(self, state: Dict[str, torch.Tensor], epoch: int, arch: str, config: Dict[str, Any],
               **options) -> str:
        """`epoch_<epoch>.pt`, loadable by stock open_clip, and its open_clip local folder `epoch_<epoch>/`
        (compclip.models.export_checkpoint with `options`; rank 0 writes them); returns the `.pt` path."""
        from compclip.models import export_checkpoint

        path = str(self.dir / f"epoch_{epoch}.pt")
        if self.rank == 0:
            export_checkpoint(state, path, epoch, arch, config, **options)
            logger.info("exported open_clip checkpoint %s", path)
            self._prune_exports()
        return path

    def _prune_exports(self) -> None:
        exports = self.run.exports()
        for _, path in exports[:-self.keep_exports] if self.keep_exports else []:
            path.unlink()
            shutil.rmtree(path.with_suffix(""), ignore_errors=True)  # its local-dir folder
            logger.info("log.keep_exports=%d: deleted %s", self.keep_exports, path)

    def resume(self, engine, located: Tuple[Path, str]) -> Tuple[ResumePoint, Dict[str, Any]]:
        """Load DeepSpeed's state of the tag `located` (compclip.runfolder.locate) into `engine`; (where to continue,
        this rank's extras)."""
        root, tag = located
        for name in newer_incomplete(root, tag) if self.rank == 0 else ():
            logger.warning("resume: skipping %s: incomplete (its save was interrupted before the commit); using %s",
                           root / name, root / tag)
        saved_world = runfolder.marker(root / tag).get("world_size", self.world_size)
        extras_path = root / tag / EXTRAS.format(rank=self.rank)
        if saved_world != self.world_size or not extras_path.exists():
            raise ConfigError(f"resume: {root / tag} was written by {saved_world} ranks"
                              f"{'' if extras_path.exists() else f' ({extras_path.name} missing)'}, this run has "
                              f"{self.world_size}; use init_from to continue on a different number of ranks")
        extras = read_extras(extras_path)  # before DeepSpeed's load: a bad file fails fast, naming its field
        _, client = engine.load_checkpoint(str(root), tag=tag)
        state = client.get("compclip") if isinstance(client, dict) else None
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in COUNTERS):
            raise ConfigError(f"resume: {root / tag}: DeepSpeed's client state has no compclip counters "
                              f"({', '.join(COUNTERS)}): not a checkpoint compclip wrote")
        point = ResumePoint(state["epoch"], state["micro_in_epoch"], state["global_step"],
                            rng_state_from_safe(extras["rng"]), extras.get("data"))
        logger.info("resumed from %s at epoch %d, micro-batch %d, step %d", root / tag, point.epoch,
                    point.micro_in_epoch, point.global_step)
        return point, extras

    def init_from(self, clip: torch.nn.Module, located: Tuple[Path, str]) -> Optional[Dict[str, torch.Tensor]]:
        """Load the consolidated fp32 weights of the tag `located`, written by any number of ranks, into `clip`;
        returns the consolidated EMA teacher weights (None when the checkpoint has no teacher)."""
        from compclip.models import load_trained_weights, parameter_group_names

        root, tag = located
        missing, unexpected = load_trained_weights(clip, consolidated_fp32(root, tag,
                                                                           parameter_group_names(clip, "clip.")))
        if missing or unexpected:
            raise ValueError(f"init_from {root / tag}: missing {missing}, unexpected {unexpected}")
        teacher = consolidated_teacher(root / tag)
        logger.info("initialised weights from %s (consolidated fp32%s); optimizer, schedule and data order "
                    "start fresh", root / tag, " + EMA teacher" if teacher is not None else "")
        return teacher


def first_intact(located: Sequence[Tuple[Path, str]], problems: Callable[[Path], List[str]], key: str,
                 warn: bool = True, retry: str = "resume") -> Tuple[Path, str]:
    """The first (folder, tag) of `located` (compclip.runfolder.candidates: a line's newest complete tag, then its
    ancestors; or one explicit tag) for which `problems(tag_dir)` (compclip.runfolder.verify, or its collective form
    in Checkpointer.verified) finds nothing. A tag that fails is passed over with a warning naming the bad file;
    ConfigError when none is left (an explicit tag: the one asked for). `key` names the option in the messages,
    `retry` the command to run on another tag."""
    located, failures = [Path(root) / tag for root, tag in located], []
    for index, tag_dir in enumerate(located):
        found = problems(tag_dir)
        if not found:
            return tag_dir.parent, tag_dir.name
        failures.append(f"{tag_dir}: {'; '.join(found)}")
        if warn and index + 1 < len(located):
            logger.warning("%s: %s fails verification (%s); falling back to %s, the previous complete tag of its "
                           "line", key, tag_dir, "; ".join(found), located[index + 1])
    if len(located) == 1:
        raise ConfigError(f"{key}: {failures[0]}. The checkpoint does not match its completion marker; {retry} "
                          f"another tag of {located[0].parent} (or `latest`)")
    raise ConfigError(f"{key}: no intact checkpoint on the current line:\n  " + "\n  ".join(failures))


# --------------------------------------------------------------------------------------------------------------
# A rank's extras

COUNTERS = ("epoch", "micro_in_epoch", "global_step")
EXTRAS_FIELDS = {"rng": dict, "nonfinite": int, **{counter: int for counter in COUNTERS}}
"""The fields every `compclip_rank<r>.pt` holds, and their types (besides the stateful objects' states)."""


def read_extras(path: Path) -> Dict[str, Any]:
    """A rank's extras `compclip_rank<r>.pt`, checked field by field; ConfigError naming the file and the field.
    Verification (the marker's checksum) has already vouched for the bytes: what this catches is a file another
    program or version wrote."""
    try:
        extras = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises a dozen types on a bad file; all mean the same
        raise ConfigError(f"resume: {path}: unreadable ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(extras, dict):
        raise ConfigError(f"resume: {path}: expected a mapping of fields, got {type(extras).__name__}")
    for field, kind in EXTRAS_FIELDS.items():
        if not isinstance(extras.get(field), kind) or isinstance(extras.get(field), bool):
            raise ConfigError(f"resume: {path}: field {field!r} missing or not {kind.__name__} "
                              f"({type(extras.get(field)).__name__})")
    try:
        _check_rng(rng_state_from_safe(extras["rng"]))
    except Exception as error:  # noqa: BLE001 - any malformed part of a generator state
        raise ConfigError(f"resume: {path}: field 'rng' is not a generator state ({type(error).__name__}: "
                          f"{str(error)[:200]})") from None
    if not isinstance(extras.get("data"), (dict, type(None))):
        raise ConfigError(f"resume: {path}: field 'data' is not a data position ({type(extras['data']).__name__})")
    pending = extras.get("pending_evaluation")
    if pending is not None and not (isinstance(pending, dict) and isinstance(pending.get("label"), str)
                                    and isinstance(pending.get("epoch"), int)):
        raise ConfigError(f"resume: {path}: field 'pending_evaluation' is not {{label, epoch}} ({str(pending)[:80]})")
    return extras


def _check_rng(state: Dict[str, Any]) -> None:
    """Load `state` into fresh generators (the process's own are restored later, once)."""
    import random

    import numpy as np

    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    torch.Generator().set_state(state["torch"])


# --------------------------------------------------------------------------------------------------------------
# Files of a tag


@contextlib.contextmanager
def _recording_writes(engine):
    """The paths DeepSpeed's checkpoint engine saves inside the block (every shard and state file goes through its
    `save`), so that the rank that wrote a file is the one that fsyncs it: on a network file system only the
    writer's fsync flushes its cache."""
    checkpoint_engine, written = engine.checkpoint_engine, []
    own = "save" in vars(checkpoint_engine)
    original = checkpoint_engine.save

    def save(state_dict, path):
        original(state_dict, path)
        written.append(Path(path))

    checkpoint_engine.save = save
    try:
        yield written
    finally:
        if own:
            checkpoint_engine.save = original
        else:
            del checkpoint_engine.save


def _fsynced_records(tag_dir: Path, paths: Sequence[Path]) -> Dict[str, Dict[str, Any]]:
    """{path relative to `tag_dir`: {"size", "crc32"}} of `paths`, each fsynced first."""
    records = {}
    for path in paths:
        durable.fsync_file(path)
        size, crc = durable.checksum(path)
        records[Path(path).resolve().relative_to(tag_dir.resolve()).as_posix()] = {"size": size,
                                                                                 durable.CHECKSUM: crc}
    return records


def _files_below(tag_dir: Path) -> List[Path]:
    """The files of a tag, in every sub-folder, without hidden ones (a writer's temporary files)."""
    return sorted(path for path in tag_dir.rglob("*") if path.is_file() and not any(
        part.startswith(".") for part in path.relative_to(tag_dir).parts))


def _delete(tag_dir: Path) -> None:
    """Delete a tag: renamed to a hidden name first, so a kill during the deletion leaves no half-deleted tag
    under a tag's name (`prune` removes what it left)."""
    trash = tag_dir.with_name(TRASH + tag_dir.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(tag_dir, trash)
    shutil.rmtree(trash)


def _step(tag_dir: Path) -> int:
    return int(runfolder.TAG.fullmatch(tag_dir.name).group(1))


def _relative_to(tag_dir: Path, root: Path) -> str:
    """`tag_dir` relative to `root` when it lies inside (a line record moves with its run folder), else absolute."""
    try:
        return tag_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(tag_dir.resolve())


def _abandoned_lines(ds_dir: Path) -> List[int]:
    """The line numbers of `abandoned/line<L>/` folders (a new line's number stays above them)."""
    folder = ds_dir / ABANDONED
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return [int(name[4:]) for name in names if name.startswith("line") and name[4:].isdigit()]


# --------------------------------------------------------------------------------------------------------------
# Consolidated weights of a tag (init_from, compclip-export)


def consolidated_fp32(root: Path, tag: str, group_names: List[List[str]]) -> Dict[str, torch.Tensor]:
    """The fp32 weights of the tag `root/tag`, written by any number of ranks under any ZeRO stage, under the
    names DeepSpeed saved (the Encoder's: `clip.` prefix):

    * ZeRO 1-3: DeepSpeed's `zero_to_fp32` (the optimizer's fp32 partitions; frozen parameters from the fragments
      DeepSpeed saves of them). DeepSpeed saves those fragments from stage 2 on only; under ZeRO-1 every rank holds
      the frozen parameters whole, so they come from the module states.
    * stage 0 (no optimizer partitions, which `zero_to_fp32` needs): the module states; with bf16, the optimizer's
      per-parameter fp32 masters replace the trained parameters, matched by `group_names` (the parameter names of
      each optimizer group in order: compclip.models.parameter_group_names).

    A frozen parameter (a locked tower) has no fp32 master: its value is the compute copy."""
    tag_dir = root / tag
    module_states = tag_dir / "mp_rank_00_model_states.pt"  # ZeRO 0-2 (ZeRO-3 writes one per rank)
    if any(tag_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        if module_states.is_file():
            module = torch.load(module_states, map_location="cpu", weights_only=False)["module"]
            for key, value in module.items():
                state.setdefault(key, value.float())
        return state
    saved = torch.load(module_states, map_location="cpu", weights_only=False)
    state = {key: value.float() for key, value in saved["module"].items()}
    optimizer = saved.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    for names, tensors in zip(group_names, masters or ()):
        if len(names) != len(tensors):
            raise ValueError(f"{tag_dir}: an optimizer group holds {len(tensors)} fp32 masters, the model's has "
                             f"{len(names)} parameters (another model or other locked towers?)")
        for name, master in zip(names, tensors):
            state[name] = master.float().reshape(state[name].shape)
    return state


def consolidated_teacher(tag_dir: Path) -> Optional[Dict[str, torch.Tensor]]:
    """The EMA teacher's full fp32 parameters from every rank's `compclip_rank<r>.pt` of a tag (None when the run
    has no teacher)."""
    from compclip.trainer.ema import consolidate_shards

    files = sorted(tag_dir.glob("compclip_rank*.pt"), key=lambda p: int(p.stem[len("compclip_rank"):]))
    states = [read_extras(f).get("teacher") for f in files]
    return consolidate_shards(states) if states and states[0] is not None else None
