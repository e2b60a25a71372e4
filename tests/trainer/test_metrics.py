"""What a run writes about itself, read back from the real writers: one training run (one process, the tiny model,
with its synthetic evaluation before and after) logging to tensorboard and to Weights & Biases in offline mode
(no network). The W&B run file (`<run>/wandb/offline-run-*/run-<id>.wandb`, records in LevelDB's log format,
each a `wandb_internal_pb2.Record`) holds the run's project, entity, name, tags and resolved configuration, the
same scalars as metrics.jsonl and tensorboard at the same steps, each evaluation's table and its folder as an
artifact. The step lines and the progress lines of out.log carry elapsed time, ETA and samples/s, and the
clip_benchmark JSONs of the trainer's evaluations name the model."""
import json
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32 * 1024  # LevelDB log: records in 32 KiB blocks, each chunk with a 7-byte header (crc, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The `Record`s of a `.wandb` run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]  # W&B's 7-byte file header: magic, version
    records, payload, position = [], b"", 7
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding at the end of a block
            position += left
            continue
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def _items(items):
    """{key: value} of a history / config record's items (nested keys joined with '/')."""
    return {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items}


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_a_run_tracked_by_tensorboard_and_wandb_offline(tmp_path, one_process, monkeypatch):
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.setenv("COMPCLIP_PROGRESS_INTERVAL", "0")  # a progress line at every step
    from compclip.train import main

    main(["--config", str(ROOT / "configs" / "negclip.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
          "--eval_synthetic=true", "--eval_before=true", "--log.progress=true", "--threads=1",
          f"--log.logs={tmp_path}", "--log.name=run", f"--data.synthetic.root={tmp_path.parent / 'synthetic-yaml'}",
          "--log.wandb=true", "--log.wandb_mode=offline", "--log.wandb_project=proj", "--log.wandb_entity=team",
          "--log.wandb_name=tiny negclip", "--log.wandb_tags=[tiny, negclip]"])
    _check_wandb(tmp_path / "run")
    _check_lines(tmp_path / "run")


def _check_wandb(tracked_run):
    import yaml

    run_id = (tracked_run / "wandb" / "compclip_run_id").read_text()
    (run_file,) = (tracked_run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(run_file)
    kinds = [record.WhichOneof("record_type") for record in records]
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert (run.project, run.entity, run.display_name, list(run.tags)) == ("proj", "team", "tiny negclip",
                                                                         ["tiny", "negclip"])
    config = _items(run.config.update)
    config.pop("_wandb", None)
    assert config == yaml.safe_load((tracked_run / "config.yaml").read_text())
    assert "exit" in kinds  # finished

    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.setdefault(record.history.step.num, {}).update(_items(record.history.item))
    board = _tensorboard(tracked_run / "tensorboard")
    rows = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    numbers = [(row["step"], key, value) for row in rows for key, value in row.items()
               if key != "step" and isinstance(value, (int, float))]
    assert {key for _, key, _ in numbers} >= {"loss", "lr", "samples_per_s", "eval/sugarcrepe/relation_swap"}
    for step, key, value in numbers:
        assert history[step][key] == pytest.approx(value, rel=1e-12), (step, key)
        assert board[key][step] == pytest.approx(value, rel=1e-6), (step, key)  # tensorboard stores float32
    assert set(board) == {key for _, key, _ in numbers}

    evaluations = {}
    for record in records:
        if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "evaluation":
            evaluations[record.artifact.name] = {entry.path for entry in record.artifact.manifest.contents}
    assert set(evaluations) == {f"eval-before-{run_id}", f"eval-step_2-{run_id}"}
    for label, files in zip(("before", "step_2"), evaluations.values()):
        assert files == {p.name for p in (tracked_run / "eval" / label).iterdir()}
        assert {"sugarcrepe.json", "retrieval.json", "results.md", "results.csv"} <= files
    tables = [history[step]["eval_table/path"] for step in (0, 2)]
    media = run_file.parent / "files"
    final = {(row[2], row[3]): row[4] for row in json.loads((media / tables[1]).read_text())["data"]}
    assert final[("sugarcrepe", "relation_swap")] == pytest.approx(history[2]["eval/sugarcrepe/relation_swap"])
    assert len(final) == sum(1 for step, key, _ in numbers if step == 2 and key.startswith("eval/"))


def _check_lines(tracked_run):
    log = (tracked_run / "out.log").read_text()
    step_lines = [line for line in log.splitlines() if "| step " in line]
    assert len(step_lines) == 2
    for line in step_lines:
        head = line.split("| step ", 1)[1].split(" | ")
        assert head[0].startswith(("1/2 epoch 0", "2/2 epoch 0"))
        assert head[1].startswith("elapsed 0:0") and head[2].startswith("ETA 0:0") and head[3].endswith(" samples/s")
    assert "train: 1/2 steps (50.0%)" in log and "train: 2/2 steps (100.0%)" in log and "| done |" in log
    before = json.loads((tracked_run / "eval" / "before" / "retrieval.clip_benchmark.json").read_text())
    after = json.loads((tracked_run / "eval" / "step_2" / "retrieval.clip_benchmark.json").read_text())
    assert before["model"] == after["model"] == "compclip-tiny"
    assert before["pretrained"] == "random init"
    assert after["pretrained"] == str(tracked_run / "checkpoints" / "epoch_1.pt")


def test_a_preempted_run_draws_its_curves(tmp_path, one_process, monkeypatch, capsys):
    """SIGTERM (COMPCLIP_FAULT's, during step 2): the run saves, exits 143 without its final report, and
    curves.png shows what it has."""
    from compclip.train import main
    from compclip.trainer.preemption import PREEMPTED

    monkeypatch.setenv("COMPCLIP_FAULT", "sigterm:2")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(ROOT / "configs" / "clip.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
              "--optim.max_steps=4", "--eval_synthetic=false", "--threads=1", f"--log.logs={tmp_path}",
              "--log.name=run", f"--data.synthetic.root={tmp_path.parent / 'synthetic-yaml'}"])
    assert info.value.code == PREEMPTED
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert "exported checkpoint" not in capsys.readouterr().out  # no final report in the grace period
