"""Every kernel launch goes to the GPU its tensors live on (issue 28: Triton launches on the *current* device).

Static over the package: the only place a kernel is launched (``kernel[grid](...)``) is ``_common.launch``, every
kernel module launches through it, and ``launch`` enters ``torch.cuda.device`` of its first tensor argument."""
import ast
from pathlib import Path

import torch

import compclip.kernels as kernels
from compclip.kernels import _common

PACKAGE = Path(kernels.__file__).parent


def _functions_launching(tree):
    """Names of the functions whose body contains a ``kernel[grid](...)`` call (a subscript by anything but an
    integer literal, which would be a tuple lookup)."""
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and not (
                        isinstance(node.func.slice, ast.Constant) and isinstance(node.func.slice.value, int)):
                    found.add(fn.name)
    return found


def test_kernels_are_launched_only_through_common_launch():
    launchers = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = _functions_launching(tree)
        if names:
            launchers[path.name] = names
        calls_launch = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "launch"
                           for n in ast.walk(tree))
        if calls_launch and path.name != "_common.py":
            imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "_common"]
            assert any(alias.name == "launch" for n in imports for alias in n.names), path.name
    assert launchers == {"_common.py": {"launch"}}, launchers


def test_launch_enters_the_device_of_its_first_tensor(monkeypatch):
    entered, calls = [], []

    class Guard:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((grid, len(args)))

    monkeypatch.setattr(_common, "device_guard", Guard)
    first = torch.empty(2, device="meta")
    _common.launch(Kernel(), (3,), 7, None, first, torch.empty(1), BLOCK=16)
    _common.launch(Kernel(), (0, 4), first)                       # empty grid: nothing runs
    assert entered == [first.device] and calls == [((3,), 4)]


def test_device_guard_selects_the_tensors_gpu():
    guard = _common.device_guard(torch.device("cuda", 1))         # built without touching a driver
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_common.device_guard(torch.device("cpu")), torch.cuda.device)
