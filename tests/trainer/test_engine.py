"""compclip.trainer.engine pieces that need no DeepSpeed engine: model.tf32 sets PyTorch's TF32 switches for CUDA
(the fused kernels' float32 dots follow the same flag: tests/kernels/test_kernel_contrastive.py) and touches nothing
on a CPU."""
import pytest
import torch

from compclip.trainer.engine import configure_tf32


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_model_tf32_switches_matmul_and_cudnn_on_cuda_only(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert "no effect on cpu" in configure_tf32(True, torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    message = configure_tf32(True, torch.device("cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert "on" in message and torch.get_float32_matmul_precision() == "high"
    configure_tf32(False, torch.device("cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert torch.get_float32_matmul_precision() == "highest"
