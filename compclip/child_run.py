"""Training runs started as child processes of another program, each reused when it has finished before with the
same inputs: the bag-of-words start of `model.pretrained: synthetic-bow` (compclip.bow) and every run of the study
(compclip.study).

A child is `python -m compclip.train --config <runs>/<name>.yaml` with a complete config written by the parent, so
the child's own layering never adds anything (the config names its data). It runs in a world of one on its own
free port, whatever launcher the parent is under. When it ends, `<run>/child_done.json` records the inputs' key
(config and training data), the folder of its last evaluation and its duration; a later call with the same key
returns at once.

A quiet child (the study's runs) is forked from a multiprocessing fork server that has imported the trainer's
modules once (torch, DeepSpeed, open_clip: about 5 s of a CPU per process), so that a queue of short
runs does not pay them per run; it is still a process of its own (its memory returns, a crash fails only its run),
and its console output goes to `<runs>/<name>.console.log`. A verbose child (its output live on this terminal, as
the bag-of-words start's) is a plain `python -m compclip.train` process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import yaml

log = logging.getLogger("compclip.child_run")

DONE = "child_done.json"
LEGACY_DONE = "study_done.json"  # what finished runs wrote before this module had its own name
FORK_SERVER = "forkserver"
PRELOAD = ["compclip.train", "compclip.trainer", "compclip.trainer.evaluator", "compclip.models",
           "compclip.evaluation", "deepspeed", "torch.utils.tensorboard"]
"""What the fork server imports once for all its children (a module that fails to import is skipped there)."""


@dataclass(frozen=True)
class Benchmark:
    """What a child run trains on and is evaluated on: a training manifest (or WebDataset shard pattern), a folder of
    SugarCrepe-format `<subset>.json` sets with their image root, and optionally a Karpathy-style retrieval file."""

    train_manifest: str
    sugarcrepe: str
    image_root: str
    subsets: Tuple[str, ...]
    retrieval: Optional[str] = None
    retrieval_image_root: Optional[str] = None
    builtin: bool = False
    """The synthetic world (compclip.data.synthetic), as opposed to one given by a user."""

    @classmethod
    def synthetic(cls, paths) -> "Benchmark":
        """The Benchmark of a generated synthetic world (its `WorldPaths`)."""
        return cls(paths.train, paths.eval_dir, paths.eval_image_root, tuple(sorted(paths.eval)), paths.retrieval,
                   paths.root, builtin=True)

    def describe(self) -> Dict[str, Any]:
        return {"train_manifest": self.train_manifest, "eval_sugarcrepe": self.sugarcrepe,
                "eval_image_root": self.image_root, "subsets": list(self.subsets), "retrieval": self.retrieval,
                "builtin": self.builtin}

    def manifest_files(self) -> List[str]:
        """The files behind the training manifest (the file, or each shard of a pattern)."""
        from compclip.data.survey import source_files

        return source_files(self.train_manifest)


def stage_config(benchmark: Benchmark, arch: str, batch_size: int, num_negatives: int, stage: Dict[str, Any],
                 threads: int) -> Dict[str, Any]:
    """The complete config of one training stage on `benchmark`: `stage` gives epochs, lr, warmup_steps and
    optionally max_steps; evaluation on every subset (and retrieval) at the end, fp32, no DeepSpeed checkpoint."""
    optim = {"lr": stage["lr"], "weight_decay": 0.1, "warmup_steps": stage["warmup_steps"],
             "epochs": stage["epochs"], "max_steps": stage.get("max_steps", 0), "grad_clip": 1.0}
    evaluation = {"sugarcrepe": benchmark.sugarcrepe, "sugarcrepe_image_root": benchmark.image_root,
                  "sugarcrepe_subsets": list(benchmark.subsets), "precision": "fp32", "progress": False}
    if benchmark.retrieval:
        evaluation.update(retrieval=benchmark.retrieval, retrieval_image_root=benchmark.retrieval_image_root)
    return {"model": {"arch": arch, "pretrained": ""},
            "data": {"train_manifest": benchmark.train_manifest, "batch_size": batch_size,
                     "num_negatives": num_negatives},
            "optim": optim, "eval": evaluation, "eval_synthetic": False, "threads": threads,
            "log": {"progress": False, "save_deepspeed": False, "keep_exports": 1, "every_n_steps": 10}}


def fingerprint(cfg: Dict[str, Any], benchmark: Benchmark) -> str:
    """What a finished run depends on: its config (less the thread count, which changes the speed, not the run)
    and the training manifest's (or its shards') size and modification time."""
    stats = [os.stat(f) for f in benchmark.manifest_files()]
    cfg = {key: value for key, value in cfg.items() if key != "threads"}
    manifest = [[stat.st_size, int(stat.st_mtime)] for stat in stats]
    # one file keeps the key it had before shard patterns were accepted, so finished runs stay reusable
    blob = json.dumps({"cfg": cfg, "manifest": manifest[0] if len(manifest) == 1 else manifest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _done_record(run_dir: str) -> Optional[Dict[str, Any]]:
    for name in (DONE, LEGACY_DONE):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
    return None


def final_eval(run_dir: str) -> str:
    """The evaluation folder of a finished child run's last evaluation."""
    record = _done_record(run_dir)
    if record is None:
        raise FileNotFoundError(f"{run_dir}: not a finished child run (no {DONE})")
    return record["eval"]


def run_seconds(run_dir: str) -> Optional[float]:
    record = _done_record(run_dir)
    return None if record is None else record.get("seconds")


def finished(cfg: Dict[str, Any], benchmark: Benchmark, runs: str) -> bool:
    """Whether the run of `cfg` has finished before with the same inputs (`run_child` then reuses it)."""
    record = _done_record(os.path.join(runs, cfg["log"]["name"]))
    return record is not None and record.get("key") == fingerprint(cfg, benchmark)


def run_child(cfg: Dict[str, Any], benchmark: Benchmark, runs: str, verbose: bool) -> str:
    """Run compclip/train.py on `cfg` in a child process (reused when finished with the same inputs; module
    docstring); returns the run folder `<runs>/<cfg.log.name>`."""
    name = cfg["log"]["name"]
    run_dir = os.path.join(runs, name)
    if finished(cfg, benchmark, runs):
        log.info("%s: finished before, reused", name)
        return run_dir
    key = fingerprint(cfg, benchmark)
    shutil.rmtree(run_dir, ignore_errors=True)  # a changed or interrupted run starts over (runs are minutes long)
    os.makedirs(runs, exist_ok=True)
    config_file = os.path.join(runs, f"{name}.yaml")
    with open(config_file, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg, handle, sort_keys=False)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONUNBUFFERED="1")
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(variable, None)  # a world of one of its own (compclip.trainer.engine.single_process_environment)
    t0 = time.time()
    if verbose or FORK_SERVER not in multiprocessing.get_all_start_methods():
        result = subprocess.run([sys.executable, "-m", "compclip.train", "--config", config_file], env=env,
                                stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        code, output = result.returncode, result.stdout or ""
    else:
        console = os.path.join(runs, f"{name}.console.log")
        code = _forked(config_file, env, console)
        with open(console, encoding="utf-8", errors="replace") as handle:
            output = handle.read()
    if code != 0:
        raise RuntimeError(f"run {name} failed (exit {code}); config {config_file}, log "
                           f"{os.path.join(run_dir, 'out.log')}\n{output[-3000:]}")
    evals = [os.path.join(run_dir, "eval", f) for f in os.listdir(os.path.join(run_dir, "eval"))
             if f not in ("before", "curve")]  # curve: the periodic evaluations of eval.every_n_steps
    if not evals:
        raise RuntimeError(f"run {name} finished without a final evaluation ({run_dir}/eval)")
    with open(os.path.join(run_dir, DONE), "w", encoding="utf-8") as handle:  # the last evaluation
        json.dump({"key": key, "eval": max(evals, key=os.path.getmtime), "seconds": round(time.time() - t0, 1)},
                  handle)
    log.info("%s: %.0fs", name, time.time() - t0)
    return run_dir


def _forked(config_file: str, env: Dict[str, str], console: str) -> int:
    """`compclip.train --config config_file` in a child of the fork server; its exit code. An interrupt of this
    process (Ctrl-C, SIGTERM raised as an exception) terminates the child before it propagates."""
    context = multiprocessing.get_context(FORK_SERVER)
    context.set_forkserver_preload(PRELOAD)  # the server starts at the first child and keeps its imports
    child = context.Process(target=_child_main, args=(config_file, env, console), name="compclip-child-run")
    child.start()
    try:
        child.join()
    except BaseException:
        child.terminate()
        child.join()
        raise
    return child.exitcode


def _child_main(config_file: str, env: Dict[str, str], console: str) -> None:
    """In the forked child: the environment a `python -m compclip.train` process would have had, stdout and stderr
    into `console`, then the entry point (its SystemExit is the exit code; multiprocessing flushes the streams
    when the child ends)."""
    os.environ.clear()
    os.environ.update(env)
    handle = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    from compclip.train import main

    main(["--config", config_file])
