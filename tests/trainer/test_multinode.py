"""Two "nodes" x one rank on this machine: `torchrun --nnodes 2 --node_rank {0,1}`, rendezvous on localhost, each
node in its own working directory (its node-local disk), the run folder on a shared one.

Both nodes have LOCAL_RANK 0, so anything decided by LOCAL_RANK would be done twice. Checked: the run folder,
its logs and exports are written by global rank 0 only, and nothing lands on a node's disk but its own copy of
the synthetic world (a relative `data.synthetic.root`: node-local); each rank's checkpoint shards land in the
shared run folder; a second 2-node launch resumes from the first run's step-1 checkpoint and logs the first
run's steps 2-3 bit for bit."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compclip.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _launch_two_nodes(tmp_path, args):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env.pop("TRITON_INTERPRET", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "compclip" / "train.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} failed ({proc.returncode}):\n{out[-5000:]}"
    return outputs


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("loss")} for row in rows if "loss" in row}


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.cost(30)
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is installed with torch")
def test_two_nodes_write_the_run_once_and_resume(tmp_path):
    shared = tmp_path / "shared"
    common = ["--config", str(ROOT / "configs" / "negclip.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
              "--deepspeed.zero_stage=1", "--optim.max_steps=3", "--log.save_every_n_steps=1",
              "--eval_synthetic=false", "--threads=1", f"--log.logs={shared}", "--data.synthetic.root=.cache/world"]
    _launch_two_nodes(tmp_path, common + ["--log.name=first"])
    first = shared / "first"
    ds = first / "checkpoints" / "deepspeed"
    _launch_two_nodes(tmp_path, common + ["--log.name=resumed", f"--resume={ds / 'step1'}"])

    # Each node's disk holds its own copy of the world and nothing else.
    for node in (0, 1):
        files = _files(tmp_path / f"node{node}")
        assert files and all(f.startswith(".cache/world/") for f in files), (node, files[:20])
        assert (tmp_path / f"node{node}" / ".cache" / "world" / "world.json").is_file()  # complete
    assert sorted(p.name for p in shared.iterdir()) == ["first", "resumed"]
    # The run folder: one set of run files, written by rank 0 (its log holds rank 0's lines only).
    top = sorted(p.name for p in first.iterdir())
    assert top == sorted(["checkpoints", "config.requested.yaml", "config.yaml", "curves.png", "deepspeed_config.json",
                          "metrics.jsonl", "out.log", "tensorboard"]), top
    assert set(re.findall(r"\| rank (\d+) \|", (first / "out.log").read_text())) == {"0"}
    assert sorted(p.name for p in (first / "checkpoints").glob("epoch_*.pt")) == ["epoch_1.pt"]
    # Both ranks' shards and extras in every tag, one completion marker.
    for step in (1, 2, 3):
        names = {p.name for p in (ds / f"step{step}").iterdir()}
        assert {"compclip_rank0.pt", "compclip_rank1.pt", "compclip_complete.json",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert (ds / "compclip_latest").read_text() == "step3"

    straight, resumed = _losses(first), _losses(shared / "resumed")
    assert sorted(straight) == [1, 2, 3] and sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step] == straight[step], step


def test_no_file_decision_rests_on_local_rank():
    """LOCAL_RANK picks the device only: every file-writing decision uses the global rank."""
    uses = []
    for path in sorted((ROOT / "compclip").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"LOCAL_RANK|local_rank", line):
                uses.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    # device selection / `--local_rank` accepted from the launcher / a child run cleared of the launcher's variables
    allowed = ("engine.py", "config.py", "child_run.py")
    assert all(use.split(":")[0].endswith(allowed) for use in uses), uses
    engine = [use for use in uses if "engine.py" in use]
    assert all(re.search(r"device|environ", use) for use in engine), engine
