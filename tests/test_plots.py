"""Training curves: metrics.jsonl is read back exactly, and a malformed line is named."""
import json

import pytest

from compclip.plots import plot_runs, read_metrics


def test_read_metrics_and_plot(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "loss/negclip": 3.0, "lr": 0.1, "epoch": 0},
            {"step": 2, "loss": 2.5, "loss/negclip": 2.5, "lr": 0.05, "epoch": 0},
            {"step": 2, "eval/sugarcrepe/mean": 0.6, "nonfinite": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    series = read_metrics(str(tmp_path))
    assert series["loss"] == [(1, 3.0), (2, 2.5)]
    assert series["eval/sugarcrepe/mean"] == [(2, 0.6)]
    assert "nonfinite" not in series  # flags are not curves
    out = plot_runs([str(tmp_path)], str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 5_000 and out.endswith("curves.png")


def test_malformed_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(str(tmp_path))
