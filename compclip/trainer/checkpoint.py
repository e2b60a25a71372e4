"""Training checkpoints: save (an atomic, durable commit), resume (bit-identical continuation), init-from (weights
from any number of ranks), retention, the open_clip export, and a tag's consolidated fp32 weights under any ZeRO
stage (`consolidated_fp32`: init-from and `compclip-export` read them). Finding a tag in a run folder is
`compclip.runfolder`'s (it needs no process group, so the checks before ranks start use it too).

Layout of one checkpoint, `<run>/checkpoints/deepspeed/step<N>/` (a "tag"):

* DeepSpeed's own files (`engine.save_checkpoint`): module, optimizer and schedule state, sharded as the run's
  ZeRO stage shards them, plus the client state `{"compclip": {epoch, micro_in_epoch, global_step, world_size,
  config}}`.
* `compclip_rank<r>.pt` per rank: what DeepSpeed does not know: the RNG state (python, numpy, torch, cuda), the
  method's state (CE-CLIP's threshold), the EMA teacher's local storage (full tensors, or this rank's ZeRO-3
  shard), the non-finite counter, and the rank's data position (`loader.state_dict()`: skip count, streams).
* `compclip_complete.json` (rank 0, last): the completion marker, with the tag's files, world size and the run's
  requested configuration (what `--resume` restores and compares against). A tag without it is incomplete: its save
  was interrupted, and nothing resumes from it.

The commit is atomic under a kill at any instant. Every rank writes its pieces (DeepSpeed's states without
DeepSpeed's `latest` pointer, then its extras through a temporary name, an fsync and a rename: compclip.durable), a
barrier, then rank 0
writes the marker, and only then the pointers next to the tags: `compclip_latest` and DeepSpeed's `latest` (kept
for DeepSpeed's own tools), each replaced atomically. `--resume latest` takes the newest complete tag and warns
about the incomplete ones it skips; an explicit incomplete tag is refused. With `log.keep_checkpoints = N`, rank
0 then deletes the tags older than the newest N complete ones (renamed out of the way first, so a kill during the
deletion leaves no half-deleted tag under a tag's name). `compclip.trainer.faults` kills a save at each of these stages
for the tests.

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
from typing import Any, Dict, List, Optional, Tuple

import torch

from compclip import durable
from compclip.config import ConfigError, dump_yaml, to_dict
from compclip.rng import rng_state, set_rng_state
from compclip.runfolder import EXTRAS, MARKER, POINTER, TRASH, RunFolder, is_complete, newer_incomplete, tags
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
    """DeepSpeed checkpoints of one run folder, for one rank. `keep` / `keep_exports`: how many complete tags /
    exports `epoch_N.pt` to keep (0 = all)."""

    def __init__(self, run: RunFolder, rank: int, world_size: int, keep: int = 0, keep_exports: int = 0):
        self.run, self.rank, self.world_size = run, rank, world_size
        self.keep, self.keep_exports = keep, keep_exports
        self.saved_step = -1  # the step of the last checkpoint saved or resumed from
        self.dir = run.checkpoints  # exports (epoch_N.pt) live here too
        self.ds_dir = run.deepspeed
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
             extras: Dict[str, Any]) -> Path:
        """Tag `step<step>`: DeepSpeed's state + counters + the resolved config, this rank's `extras` (+ RNG state),
        committed atomically (module docstring); then the retention of `keep`. `configs`: {"config": resolved,
        "request": requested} as mappings; the request goes into the completion marker, where `--resume` reads it
        before any process group exists."""
        tag = f"step{step}"
        tag_dir = self.ds_dir / tag
        client = {"compclip": {**counters, "world_size": self.world_size, "config": configs["config"]}}
        if self.rank == 0 and is_complete(tag_dir):  # saved again (a resumed run): incomplete until re-committed
            (tag_dir / MARKER).unlink()
        faults.save_stage("before_states", step)
        engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=client, save_latest=False)
        faults.save_stage("after_states", step)
        durable.torch_save({"rng": rng_state_to_safe(rng_state()), **extras, **counters},
                           tag_dir / EXTRAS.format(rank=self.rank))
        faults.save_stage("after_extras", step)
        torch.distributed.barrier()  # every rank's pieces are on disk
        if self.rank == 0:
            files = sorted(p.name for p in tag_dir.iterdir() if not p.name.startswith("."))
            durable.write_text(tag_dir / MARKER, json.dumps({
                "tag": tag, "global_step": step, "world_size": self.world_size, "files": files,
                "request": configs["request"]}, indent=1))
            faults.save_stage("after_marker", step)
            durable.write_text(self.ds_dir / POINTER, tag)
            durable.write_text(self.ds_dir / "latest", tag)
            faults.save_stage("after_pointer", step)
            self.prune()
        torch.distributed.barrier()
        self.saved_step = step
        logger.info("saved DeepSpeed checkpoint %s", tag_dir)
        return tag_dir

    def prune(self) -> None:
        """Rank 0, after a commit: delete the tags older than the newest `keep` complete ones (none when keep =
        0), and what an interrupted deletion left."""
        for leftover in self.ds_dir.glob(TRASH + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        complete = [(step, name) for step, name in tags(self.ds_dir) if is_complete(self.ds_dir / name)]
        if not self.keep or len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep][0]
        for step, name in tags(self.ds_dir):
            if step < oldest_kept:
                trash = self.ds_dir / (TRASH + name)
                os.replace(self.ds_dir / name, trash)  # a kill from here on leaves no tag named `name`
                shutil.rmtree(trash)
                logger.info("log.keep_checkpoints=%d: deleted %s", self.keep, self.ds_dir / name)

    def save_training(self, engine, counters: Dict[str, int], resolved, stateful: Dict[str, Any],
                      values: Dict[str, Any]) -> Path:
        """`save` of a training run: `stateful` objects (method, teacher, data loader; None allowed) are stored by
        their `state_dict()` under their names, `values` as they are; see `restore_training`."""
        extras = {name: obj.state_dict() if obj is not None else None for name, obj in stateful.items()}
        configs = {"config": to_dict(resolved.config), "request": to_dict(resolved.requested)}
        return self.save(engine, counters["global_step"], counters, configs, {**extras, **values})

    def restore_training(self, engine, located: Tuple[Path, str],
                         stateful: Dict[str, Any]) -> Tuple[ResumePoint, Dict[str, Any]]:
        """`resume`, then `load_state_dict` of every `stateful` object (None skipped) from its saved state. The
        data loader is not among them: its position is restored at its epoch (`epoch_batches`)."""
        point, extras = self.resume(engine, located)
        self.saved_step = point.global_step  # an epoch end right at the resume point saves nothing new
        for name, obj in stateful.items():
            if obj is not None:
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
        marker = root / tag / MARKER
        saved_world = json.loads(marker.read_text())["world_size"] if marker.is_file() else self.world_size
        extras_path = root / tag / EXTRAS.format(rank=self.rank)
        if saved_world != self.world_size or not extras_path.exists():
            raise ConfigError(f"resume: {root / tag} was written by {saved_world} ranks"
                              f"{'' if extras_path.exists() else f' ({extras_path.name} missing)'}, this run has "
                              f"{self.world_size}; use init_from to continue on a different number of ranks")
        _, client = engine.load_checkpoint(str(root), tag=tag)
        state = client["compclip"]
        extras = torch.load(extras_path, map_location="cpu", weights_only=True)
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
    states = [torch.load(f, map_location="cpu", weights_only=True).get("teacher") for f in files]
    return consolidate_shards(states) if states and states[0] is not None else None
