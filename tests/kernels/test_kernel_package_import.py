"""compclip.kernels' import: a missing Triton is a logged reason (ops absent, references serve); a broken kernel
module is an error that the package import raises. Each case runs in a fresh interpreter so sys.modules tricks
cannot leak into other tests."""
import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_missing_triton_is_a_logged_reason_and_references_serve():
    result = _run("""
        import logging, sys
        logging.basicConfig(level=logging.INFO)
        sys.modules["triton"] = None            # `import triton` now raises ImportError
        sys.modules["triton.language"] = None
        import torch
        import compclip.kernels as kernels
        assert not hasattr(kernels, "contrastive_row_loss")
        assert "triton is not importable" in kernels.dispatch.triton_available()
        op = kernels.dispatch.kernel_op("contrastive_row_loss", "auto", (torch.ones(2, 3),))
        assert op is kernels.reference.contrastive_row_loss
        try:
            kernels.dispatch.kernel_op("contrastive_row_loss", "triton", (torch.ones(2, 3),))
        except RuntimeError as error:
            assert "triton is not importable" in str(error)
        else:
            raise AssertionError("backend='triton' without triton must raise")
        print("OK")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
    assert "Triton ops not loaded" in result.stderr and "triton is not importable" in result.stderr


def test_broken_kernel_module_is_raised_not_hidden(tmp_path):
    """A kernel module that fails to import, and a copy of the package whose contrastive module does not parse:
    both package imports must raise that error (one fresh interpreter for the two: each is a different package
    and a failed package import leaves nothing behind in sys.modules)."""
    import shutil
    import compclip.kernels as kernels
    from pathlib import Path

    package = tmp_path / "compclip_kernels_copy"
    shutil.copytree(Path(kernels.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "contrastive.py").write_text("def broken(:\n")
    result = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        sys.modules["compclip.kernels.grouped"] = None   # the kernel module itself fails to import
        for name in ("compclip.kernels", "compclip_kernels_copy"):
            try:
                __import__(name)
            except BaseException as error:
                print(name, type(error).__name__, error)
            else:
                print(name, "imported")
    """)
    assert result.returncode == 0, result.stderr
    broken, syntax = result.stdout.strip().splitlines()
    assert broken.startswith("compclip.kernels ") and "Error" in broken and "compclip.kernels.grouped" in broken
    assert syntax.startswith("compclip_kernels_copy SyntaxError")
