"""Grids at the target shapes (issue 28): every launch brings at least two CTAs per SM on an H100 (132 SMs) and an
A100 (108 SMs), at the global batch and at an 8-GPU rank's local batch, and the gate compiles for each
architecture the tiles and splits that GPU would pick.

Recording only: the public ops run on meta tensors with ``launch`` replaced by a recorder (compclip.kernels.aot),
so nothing is compiled or executed."""
import pytest
import torch

from compclip.kernels import _common, aot, contrastive


@pytest.fixture(scope="module")
def wave_rows():
    return aot.waves()


def test_every_launch_fills_two_waves_at_the_target_shapes(wave_rows):
    low = [f"sm_{r.arch} {r.op} {r.shape} {r.kernel}: {r.ctas} CTAs = {r.waves} waves" for r in wave_rows
           if r.waves < aot.WAVES_FLOOR]
    assert not low, "\n".join(low)
    shapes = {r.shape for r in wave_rows}
    for M in (1024, 4096, 32768):                   # the local M of the issue, against 5·B and B columns
        assert any(shape.startswith(f"M={M} ") for shape in shapes), M
    assert {r.arch for r in wave_rows} == {80, 90}
    assert {r.op.split(" ")[0] for r in wave_rows} == {"contrastive_row_loss", "contrastive_row_loss[atomic]",
                                                       "grouped_contrast_row_loss", "xac_loss_sum",
                                                       "concept_attention_pool"}
    # the local batch is where the splits and their combines appear
    assert {"_contrastive_fwd_combine_kernel", "_sum_splits_kernel"} <= {r.kernel for r in wave_rows}


def test_gate_compiles_what_each_gpu_would_pick(monkeypatch):
    """A launch recorded for sm_80 carries the tiles and splits an A100 computes from its own device properties
    (capability 8.0, 108 SMs), not the sm_90 defaults of a process without a GPU."""
    class FakeProperties:
        multi_processor_count = 108

    class OnA100:                                   # the two attributes the launchers query
        is_cuda = True
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: FakeProperties())
    arch, sms = _common.device_arch(OnA100()), _common.sm_count(OnA100())
    assert (arch, sms) == (80, 108)
    M, N, D = 4096, 163840, 512
    on_a100 = contrastive._blocks(M, N, D, None, None, None, None, True, arch, sms)
    launches = {aot._kernel_name(ln.kernel): ln for ln in aot.record_for(aot._contrastive(M, N, D, torch.bfloat16),
                                                                          80)}
    anchors = launches["_contrastive_bwd_anchors_kernel"]
    assert anchors.meta["BLOCK_N"] == on_a100["bwd_a"]["BLOCK_N"] == 16          # sm_80's own dA tile
    assert anchors.grid[2] == on_a100["splits"]["bwd_a"][0]                      # split for 108 SMs
    assert launches["_contrastive_fwd_kernel"].grid[1] == on_a100["splits"]["fwd"][0]
    on_h100 = contrastive._blocks(M, N, D, None, None, None, None, True, 90, 132)
    assert on_h100["splits"]["bwd_a"][0] != on_a100["splits"]["bwd_a"][0]       # the SM count matters
