"""Fine-tune an open_clip model with CLIP, NegCLIP, CE-CLIP, DeGLA, C2LIP or any combination of their loss terms.

    deepspeed compclip/train.py [--config <recipe> ...] [--section.field=value ...]
    python compclip/train.py ...            # one process, no launcher
    python compclip/train.py                # the embedded default (configs/default.yaml): DeGLA on the synthetic
                                            # world from its bag-of-words CLIP, ~3 min on 2 CPU cores
    python compclip/train.py --config degla --data.train_manifest=coco.jsonl --plan --plan-world-size 8
                                            # the resolved, sized run (steps, lr, memory per GPU); nothing trains

The entry point: parse the command line (compclip.config.request), resolve the run (compclip.resolve), then train
it (compclip.trainer.Trainer). A configuration mistake is one message that names the key and exit status 2, before
any process group starts (a checkpoint to resume that fails verification: once the ranks have checked it
together), printed once under the launcher (by rank 0; the other ranks exit 2 silently).
"""
from __future__ import annotations

import os
import sys

# Run as a script, sys.path[0] is compclip/ and its modules (config, models, ...) would shadow or be shadowed by
# top-level packages; the repository root goes there instead, so a fresh clone works even before installing.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import time  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

from compclip.config import ConfigError, help_text, request  # noqa: E402
from compclip.data.inputs import InputError  # noqa: E402
from compclip.heap import startup  # noqa: E402
from compclip.resolve import ResolvedRun, launcher_world_size, resolve  # noqa: E402

CONFIG_ERROR = 2  # exit status of a configuration mistake


def _launcher_rank() -> int:
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def fail(error: Exception) -> None:
    """One message naming the key (or the file, line and field), printed by rank 0 only; every rank exits with
    CONFIG_ERROR."""
    if _launcher_rank() == 0:
        kind = "configuration error" if isinstance(error, ConfigError) else "input error"
        print(f"compclip/train.py: {kind}: {error}", file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_ERROR)


def resolve_argv(argv: List[str]) -> ResolvedRun:
    """The run `argv` asks for, on the launcher's ranks (raises ConfigError)."""
    asked = request(argv)
    return resolve(asked.config, launcher_world_size(), layers=asked.layers)


def _agreed(run: ResolvedRun) -> ResolvedRun:
    """The run with rank 0's run-folder name (a default name carries a timestamp that ranks may not share)."""
    import torch

    holder = [run.run.root.name]
    torch.distributed.broadcast_object_list(holder, src=0)
    if holder[0] == run.run.root.name:
        return run
    return resolve(run.requested, run.world_size, run_name=holder[0], layers=run.layers)


def build_trainer(argv: List[str]):
    """A Trainer from command-line arguments, in a world of one without a launcher (raises ConfigError)."""
    from compclip.trainer import Trainer, engine

    run = resolve_argv(argv)
    engine.single_process_environment()
    engine.init_process_group()
    return Trainer(_agreed(run))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        raise SystemExit(print(__doc__.strip() + "\n\n" + help_text()))
    t0 = time.time()
    with startup():  # compclip.heap: no collections while the imports run; then what they made is frozen
        try:
            asked = request(argv)
            world_size = asked.args.plan_world_size or launcher_world_size()
            run = resolve(asked.config, world_size, layers=asked.layers)
            if asked.args.plan:
                from compclip.plan import print_plan

                print_plan(run, asked, rank=_launcher_rank())
                return {"plan": True}
        except ConfigError as error:  # in the YAML / command line, or found in the files a run names
            fail(error)
        from compclip.trainer import Trainer, engine
        from compclip.trainer.evaluator import final_report
        from compclip.trainer.preemption import PREEMPTED

        # A caller's process group (a test, a notebook) stays: DeepSpeed caches groups derived from it.
        owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        engine.single_process_environment()
        engine.init_process_group()
    try:
        trainer = Trainer(_agreed(run))
    except (ConfigError, InputError) as error:  # found once ranks look together: a checkpoint that fails
        # verification; the data read at the start (every rank reads the same and stops here)
        fail(error)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0 and not result["preempted"]:
        final_report(trainer.run, f"{trainer.method.describe()} — {result['steps']} steps in {time.time() - t0:.0f}s "
                     f"({trainer.world_size} rank{'s' * (trainer.world_size > 1)}, {trainer.device})", result)
    torch.distributed.barrier()
    if owns_process_group:
        torch.distributed.destroy_process_group()
    if result["preempted"]:  # SIGTERM: checkpoint saved, `--resume latest` continues
        raise SystemExit(PREEMPTED)
    return result


def cli() -> None:
    """`compclip-train`: main() without its result as the exit status (a dict there would exit 1)."""
    main()


if __name__ == "__main__":
    main()
