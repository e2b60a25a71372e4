"""Test helper: training worlds of N ranks as forked children of one Python process that imported the trainer
once, run one after the other from a JSON plan. A world costs its training, not N fresh interpreters.

    python tests/trainer/fork_world.py PLAN.json RESULTS.json LOG_DIR

PLAN: a list of {"argv": [...], "ranks": N, "env": {...}, "damage": [[how, glob], ...], "hook": "FILE.py:function"};
RESULTS: per world {"codes": [...], "seconds": s}, the exit status of each rank (negative: killed by that signal).
`damage` is done to the files matching each glob before the world starts, as a power loss or a failing disk would
leave them: `truncate` (to half their size) or `flip` (one byte in the middle inverted). The hook (optional) is
called in every rank before the run (a test's probe into the live trainer). Like a launcher, when a rank is killed by a
signal the supervisor SIGKILLs the others (a node that dies takes its job with it); when one exits with an error
the others get a grace period, then SIGKILL. Each rank's output goes to LOG_DIR/world<i>_rank<r>.log.
"""
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import compclip.train  # noqa: E402,F401  (imported once, before the forks, with what it imports lazily)
import compclip.data, compclip.trainer.ema, compclip.methods, compclip.models  # noqa: E401,E402,F401
import deepspeed  # noqa: E402
import deepspeed.comm  # noqa: E402,F401
from deepspeed.accelerator import get_accelerator  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401  (the final report's curves)

get_accelerator()
from compclip.distributed import free_port  # noqa: E402
from compclip.heap import freeze_startup_objects  # noqa: E402

freeze_startup_objects()  # before the forks: the children neither collect nor copy the parent's objects

GRACE_S = 60.0


def _run_hook(spec):
    import importlib.util

    path, _, function = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    getattr(module, function)()


def _child(argv, rank, ranks, port, env, log, hook=None):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    code = 1
    try:
        os.environ.update({k: str(v) for k, v in env.items()})
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if hook:
            _run_hook(hook)
        compclip.train.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: B902 - reported in the log, the status says it failed
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def _supervise(pids):
    codes, deadline = {}, None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pid] = code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            if code < 0:  # killed: the rest of the job goes with it
                deadline = 0.0
            elif code != 0 and deadline is None:
                deadline = time.time() + GRACE_S
        if deadline is not None and time.time() >= deadline:
            for other in pids:
                if other not in codes:
                    os.kill(other, signal.SIGKILL)
        if not pid:
            time.sleep(0.05)
    return [codes[pid] for pid in pids]


def damage(how, pattern):
    """Truncate or flip the files matching `pattern`; at least one must match (a test that damages nothing proves
    nothing)."""
    import glob

    paths = sorted(glob.glob(pattern))
    assert paths, f"nothing to damage matches {pattern}"
    for path in paths:
        data = bytearray(Path(path).read_bytes())
        if how == "truncate":
            data = data[:len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        Path(path).write_bytes(bytes(data))


def main(plan_path, results_path, log_dir):
    plan = json.loads(Path(plan_path).read_text())
    results = []
    for index, world in enumerate(plan):
        for how, pattern in world.get("damage", ()):
            damage(how, pattern)
        start, port, ranks = time.time(), free_port(), world["ranks"]
        pids = []
        for rank in range(ranks):
            pid = os.fork()
            if pid == 0:
                _child(world["argv"], rank, ranks, port, world.get("env", {}),
                       os.path.join(log_dir, f"world{index}_rank{rank}.log"), world.get("hook"))
            pids.append(pid)
        results.append({"codes": _supervise(pids), "seconds": round(time.time() - start, 2)})
        Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
