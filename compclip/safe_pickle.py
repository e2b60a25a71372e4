"""Loading untrusted pickles, and checkpoint extras that load with `torch.load(weights_only=True)`.

Unpickling runs code: every GLOBAL/STACK_GLOBAL opcode names a callable that REDUCE then calls with pickled
arguments, so a downloaded `.pkl` (C2LIP) or object `.npy` (CE-CLIP, `np.load(allow_pickle=True)`) may e.g.
write files through `os.system` or `pathlib.Path.write_text`. `SafeUnpickler` resolves only the globals in
`ALLOWED_GLOBALS` and refuses every other one *before* importing it, with an `UnsafePickleError` naming the file
and the refused `module.name`; nothing the pickle asks for runs.

Allowed: the builtins containers and scalars that pickle cannot write as plain opcodes (set, frozenset, complex,
bytearray, ..., also under protocol 2's `__builtin__` name), `_codecs.encode` (protocol 2 writes bytes with it),
`collections.OrderedDict`, and numpy's array / dtype / scalar reconstruction: `numpy._core.multiarray._reconstruct`
and `.scalar`, `numpy._core.numeric._frombuffer` (protocol 5 arrays), `numpy.ndarray`, `numpy.dtype`, also under
numpy 1.x's `numpy.core` names (numpy 2.x itself writes `numpy._core`). Object arrays hold these recursively.
A reconstructed ndarray can only carry data and a dtype (object items come from the same restricted unpickler).
Nothing allowed can allocate more than the file carries: `bytes(n)` / `bytearray(n)` with an integer size,
`range`, a direct `numpy.ndarray(shape)` call and `_reconstruct` with a non-empty shape (numpy writes `(0,)` and
sets the real shape with the data) are refused, so a tiny pickle cannot reserve gigabytes.

Every other failure of a broken file (truncated, random bytes, a header that does not match its payload) is a
`CorruptPickleError` naming the file, whatever the unpickler or numpy raised. `SafeUnpickler` is the pure-Python
unpickler, reading from memory: the C one sizes its memo table by the largest index a pickle names (see its
docstring).

`.npy` (`load_npy`): the header is parsed by `numpy.lib.format` (`read_magic`, `read_array_header_1_0/2_0`);
an object-dtype payload is the pickled array (`np.save` pickles object arrays), read with `SafeUnpickler`;
other dtypes are plain data and are read by numpy without pickle.

Checkpoint extras: `torch.load(weights_only=True)` accepts dicts, lists, tuples, str, int, float, bool, None and
tensors, but not numpy arrays. `rng_state_to_safe` turns the RNG states into exactly these (numpy's MT19937 key
becomes an int64 tensor) and `rng_state_from_safe` undoes it, bit for bit.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from typing import Any, Dict

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside `ALLOWED_GLOBALS`."""


class CorruptPickleError(pickle.UnpicklingError):
    """A `.pkl` / `.npy` file that is not a readable pickle or array (truncated, random bytes, a header that
    does not match its payload); the message names the file."""


def _refuse_sizes(constructor):
    """`constructor` (bytes, bytearray) refusing an integer argument: `bytearray(10**11)` is a size, not data,
    and would make a 60-byte pickle allocate 100 GB. Pickle writes real bytes/bytearray values as data."""
    def build(*args):
        if args and isinstance(args[0], int):
            raise UnsafePickleError(f"refusing {constructor.__name__}({args[0]}): a size, not data")
        return constructor(*args)

    build.__name__ = constructor.__name__
    return build


class _ArrayClass:
    """What the name `numpy.ndarray` resolves to: only `_reconstruct` accepts it (as the array class); calling it
    (`ndarray((10**10,))` would reserve memory by a shape alone) fails as a call of a non-callable."""


def _bounded_reconstruct(reconstruct):
    """numpy's `_reconstruct(ndarray, shape, dtype)` for shapes of at most one element: numpy pickles an array as
    `_reconstruct(ndarray, (0,), b'b')` and then sets its real shape and data, which the pickle must carry."""
    def build(subtype, shape, dtype):
        if subtype is not _ArrayClass or not isinstance(shape, tuple) or int(np.prod(shape, dtype=np.int64)) > 1:
            raise UnsafePickleError(f"refusing _reconstruct({subtype!r}, {shape!r}): numpy writes (ndarray, (0,))")
        return reconstruct(np.ndarray, shape, dtype)

    return build


def _allowed_globals() -> Dict[tuple, Any]:
    builtin = {name: getattr(__import__("builtins"), name) for name in (
        "set", "frozenset", "complex", "str", "int", "float", "bool", "list", "tuple", "dict", "slice")}
    builtin.update(bytes=_refuse_sizes(bytes), bytearray=_refuse_sizes(bytearray))
    numpy_core = {"multiarray._reconstruct": _bounded_reconstruct(np._core.multiarray._reconstruct),
                  "multiarray.scalar": np._core.multiarray.scalar,
                  "numeric._frombuffer": np._core.numeric._frombuffer}
    allowed = {("_codecs", "encode"): __import__("_codecs").encode,
               ("collections", "OrderedDict"): collections.OrderedDict,
               ("numpy", "ndarray"): _ArrayClass, ("numpy", "dtype"): np.dtype}
    for module in ("builtins", "__builtin__"):
        allowed.update({(module, name): value for name, value in builtin.items()})
    for prefix in ("numpy._core", "numpy.core"):  # numpy 2.x writes numpy._core; numpy 1.x wrote numpy.core
        for dotted, value in numpy_core.items():
            sub, name = dotted.split(".")
            allowed[(f"{prefix}.{sub}", name)] = value
    return allowed


ALLOWED_GLOBALS = _allowed_globals()
"""(module, name) -> object: the only globals `SafeUnpickler` resolves."""


def _load_bytearray8_bounded(self):
    """BYTEARRAY8 allocates (and zero-fills) its declared length before reading: bound it by the input's size."""
    size, = struct.unpack("<Q", self.read(8))
    if size > self.input_size:
        raise UnsafePickleError(f"refusing BYTEARRAY8 of {size} bytes in an input of {self.input_size}")
    data = bytearray(size)
    self.readinto(data)
    self.append(data)


class _ExactInput(io.BytesIO):
    """The pickle's bytes, where a read that returns less than it asked for means a truncated file (the C
    unpickler's rule; the pure-Python one would go on with the short data, e.g. a FRAME cut short)."""

    def read(self, size=-1):
        data = super().read(size)
        if size is not None and 0 <= size != len(data):
            raise pickle.UnpicklingError(f"pickle data was truncated ({len(data)} of {size} bytes)")
        return data

    def readinto(self, buffer):
        count = super().readinto(buffer)
        if count != len(buffer):
            raise pickle.UnpicklingError(f"pickle data was truncated ({count} of {len(buffer)} bytes)")
        return count


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS`; `source` names the file in errors.

    It is Python's own pure-Python unpickler, not the C one: the C unpickler sizes its memo table to the largest
    memo index a pickle names, so `LONG_BINPUT 4000000000` in a 400-byte file makes it zero-fill 32 GB (the fuzz
    suite found such files). The pure-Python memo is a dict; its only allocation by a declared size,
    BYTEARRAY8, is bounded by the input's size. It is about 5 times slower than the C unpickler."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8_bounded

    def __init__(self, handle, source: str = "<pickle>"):
        data = handle.read()  # in memory, so that no read() is sized by a length the pickle declares
        super().__init__(_ExactInput(data))
        self.source = source
        self.input_size = len(data)

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global {module}.{name} (only builtins containers/scalars "
                "and numpy arrays/dtypes/scalars are allowed; a data file should need nothing else)") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing a persistent id in the pickle ({pid!r})")


def _unpickle(handle, source: str) -> Any:
    try:
        return SafeUnpickler(handle, source).load()
    except UnsafePickleError as error:
        if str(error).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - on corrupt bytes the unpickler and the allowed constructors
        # raise anything from EOFError to struct.error, TypeError or MemoryError; all mean "this file is broken"
        raise CorruptPickleError(f"{source}: not a readable pickle ({type(error).__name__}: {str(error)[:200]})"
                                 ) from None


def load_pickle(path: str) -> Any:
    """The object in pickle file `path`, unpickled by `SafeUnpickler`."""
    with open(path, "rb") as handle:
        return _unpickle(handle, str(path))


def load_npy(path: str) -> np.ndarray:
    """The array in `.npy` file `path`; an object array is unpickled by `SafeUnpickler`, never by numpy. A file
    that is not a well-formed `.npy` raises `CorruptPickleError` naming it."""
    from numpy.lib import format as npy

    with open(path, "rb") as handle:
        try:
            version = npy.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(handle)
            else:  # (3, 0): utf-8 field names; numpy has no public reader for its header
                shape, fortran, dtype = npy._read_array_header(handle, version)
            count = int(np.prod(shape, dtype=np.int64))
        except Exception as error:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, ...
            raise CorruptPickleError(f"{path}: not a .npy file ({type(error).__name__}: {error})") from None
        if not dtype.hasobject:
            data = handle.read()
            if count < 0 or len(data) != count * dtype.itemsize:
                raise CorruptPickleError(f"{path}: the header declares {shape} x {dtype} ({count * dtype.itemsize} "
                                         f"bytes), the file holds {len(data)}")
            array = np.frombuffer(data, dtype=dtype, count=count)
            return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
        array = _unpickle(handle, str(path))
    if not isinstance(array, np.ndarray) or tuple(array.shape) != tuple(shape):
        raise CorruptPickleError(f"{path}: payload is not the object array of shape {shape} the header declares")
    return array


# ---- RNG states for weights_only checkpoints ---------------------------------------------------------------------
def rng_state_to_safe(state: Dict[str, Any]) -> Dict[str, Any]:
    """{"python": random.getstate(), "numpy": np.random.get_state(), "torch": ByteTensor, "cuda"?: [ByteTensor]}
    -> the same information as lists, ints, floats and tensors only (`torch.load(weights_only=True)` loads it)."""
    version, key, gauss = state["python"]
    kind, mt, pos, has_gauss, cached = state["numpy"]
    out = {"python": [int(version), torch.tensor(key, dtype=torch.int64), None if gauss is None else float(gauss)],
           "numpy": [str(kind), torch.from_numpy(np.asarray(mt, dtype=np.int64)), int(pos), int(has_gauss),
                     float(cached)],
           "torch": state["torch"]}
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def rng_state_from_safe(safe: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of `rng_state_to_safe`: arguments for random.setstate / np.random.set_state / torch.set_rng_state."""
    version, key, gauss = safe["python"]
    kind, mt, pos, has_gauss, cached = safe["numpy"]
    out = {"python": (int(version), tuple(int(v) for v in key.tolist()), gauss),
           "numpy": (kind, mt.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)),
           "torch": safe["torch"]}
    if "cuda" in safe:
        out["cuda"] = list(safe["cuda"])
    return out


__all__ = ["ALLOWED_GLOBALS", "CorruptPickleError", "SafeUnpickler", "UnsafePickleError", "load_npy", "load_pickle",
           "rng_state_from_safe", "rng_state_to_safe"]
