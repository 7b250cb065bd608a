"""Read `torch.save` files (`.pth`, `.pt`, `.bin`, `.ckpt`) with NumPy alone, without running code.

A pickle can call any importable function while it loads, so a downloaded `.pth` is a program.
This reader is a restricted unpickler: it accepts only the few globals a state dict is made of
(`torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`, `_rebuild_parameter`, the storage classes
`torch.FloatStorage` ... `torch.BoolStorage`, `torch.Size`, `collections.OrderedDict`) and
refuses anything else (`os.system`, `builtins.eval`, a training script's own classes) with a
ValueError naming it, before calling it. torch is never imported.

Both of PyTorch's formats are read:

- zip (the default since PyTorch 1.6): `<folder>/data.pkl` holds the pickle, whose persistent ids
  `("storage", storage class, key, location, numel)` name the raw bytes in `<folder>/data/<key>`;
  `<folder>/byteorder` says their byte order (little when absent). The folder name varies.
- legacy (`_use_new_zipfile_serialization=False`): four pickles in a row (magic number, protocol
  version, system info, the object, whose persistent ids have a sixth field for storage views),
  a pickled list of storage keys, then for each key an int64 element count and the bytes, always
  little-endian.

Tensors come back as writable NumPy arrays, each a copy of its own (strides, storage offsets and
storages shared by several tensors are honoured), with the tensor's dtype, except bfloat16, which
NumPy lacks: it comes back as float32 (exact). Containers keep their structure, with
`OrderedDict`s as plain dicts; other values (epoch counters, strings) pass through.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch storage class -> NumPy dtype of its raw elements, without byte order (added per file)
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",  # the high half of a float32; widened in _to_numpy
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "u1",  # any nonzero byte is True, as in torch
}


class _Refused(Exception):
    """The pickle names a global outside the allow-list (args[0]: `module.name`)."""


class _Unreadable(Exception):
    """The file is not a well-formed PyTorch checkpoint (args[0]: why)."""


class _StorageType:
    """Stands for `torch.FloatStorage` etc. inside the pickle; deliberately not callable."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """The raw elements of one storage, or a view (legacy format) into another storage."""

    __slots__ = ("name", "elements", "parent", "start", "length")

    def __init__(self, name, elements=None, parent=None, start=0, length=0):
        self.name, self.elements = name, elements
        self.parent, self.start, self.length = parent, start, length

    def array(self) -> np.ndarray:
        if self.parent is not None:
            parent = self.parent.array()
            if self.start + self.length > parent.size:
                raise _Unreadable("a storage view runs past the end of its storage")
            return parent[self.start : self.start + self.length]
        if self.elements is None:
            raise _Unreadable("a storage has no data")
        return self.elements


class _Tensor:
    """A tensor to build once every storage is read: (storage, offset, size, stride) in elements."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


# ---------------------------------------------------------------------- the allowed globals
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if metadata and any(metadata.values()):  # conj / neg bits: lazy views torch resolves itself
        raise _Unreadable(f"a tensor has view flags {sorted(metadata)} that this reader ignores")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _Tensor):
        raise _Unreadable("a parameter wraps something other than a tensor")
    return data


def _torch_size(dims=()):
    return tuple(dims)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals in _ALLOWED; storages come from `load_storage`."""

    def __init__(self, file, load_storage: Callable[[Any], _Storage]):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 pickles write `__builtin__.eval`), mapped as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise _Refused(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        return self._load_storage(pid)


def _storage_pid(pid: Any, length: int) -> tuple[str, str]:
    """(storage class name, key) from a persistent id of `length` fields, or _Unreadable."""
    if (
        not isinstance(pid, tuple)
        or len(pid) != length
        or pid[0] not in ("storage", b"storage")
        or not isinstance(pid[2], str)
    ):
        raise _Unreadable(f"unexpected persistent id {pid!r:.80}")
    if not isinstance(pid[1], _StorageType):
        raise _Unreadable(f"a storage of unknown type {pid[1]!r:.80}")
    return pid[1].name, pid[2]


def _elements(data: bytes, name: str, byteorder: str) -> np.ndarray:
    dtype = np.dtype(byteorder + _STORAGE_DTYPES[name])
    if len(data) % dtype.itemsize:
        raise _Unreadable(f"storage bytes ({len(data)}) are not a whole number of {name} elements")
    return np.frombuffer(data, dtype=dtype)


# ---------------------------------------------------------------------- the two formats
def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = sorted(n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n))
        if len(pickles) != 1:
            raise _Unreadable("a zip archive without PyTorch's <folder>/data.pkl")
        folder = pickles[0][: -len("data.pkl")]
        byteorder = b"little"
        if folder + "byteorder" in names:
            byteorder = archive.read(folder + "byteorder").strip()
        if byteorder not in (b"little", b"big"):
            raise _Unreadable(f"unknown byte order {byteorder!r:.20}")
        order = "<" if byteorder == b"little" else ">"
        storages: dict[str, _Storage] = {}

        def load_storage(pid: Any) -> _Storage:
            name, key = _storage_pid(pid, 5)
            if key not in storages:
                entry = f"{folder}data/{key}"
                if entry not in names:
                    raise _Unreadable(f"storage {key!r:.40} is missing from the archive")
                storages[key] = _Storage(name, _elements(archive.read(entry), name, order))
            elif storages[key].name != name:
                raise _Unreadable(f"storage {key!r:.40} is read as two different types")
            return storages[key]

        data = archive.read(pickles[0])
        return _Unpickler(io.BytesIO(data), load_storage).load()


def _load_legacy(path: str) -> Any:
    storages: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def load_storage(pid: Any) -> _Storage:
        name, key = _storage_pid(pid, 6)
        root = storages.setdefault(key, _Storage(name))
        if root.name != name:
            raise _Unreadable(f"storage {key!r:.40} is read as two different types")
        view = pid[5]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise _Unreadable(f"unexpected storage view {view!r:.80}")
        view_key, start, length = view
        if view_key not in views:
            if not (_is_index(start) and _is_index(length)):
                raise _Unreadable(f"unexpected storage view {view!r:.80}")
            views[view_key] = _Storage(name, parent=root, start=start, length=length)
        return views[view_key]

    def no_storage(pid: Any) -> _Storage:
        raise _Unreadable("a storage outside the main pickle")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if _Unpickler(f, no_storage).load() != _LEGACY_MAGIC_NUMBER:
            raise _Unreadable("a pickle without PyTorch's magic number")
        if _Unpickler(f, no_storage).load() != _LEGACY_PROTOCOL_VERSION:
            raise _Unreadable("an unknown legacy protocol version")
        _Unpickler(f, no_storage).load()  # system info; the data are little-endian regardless
        result = _Unpickler(f, load_storage).load()
        keys = _Unpickler(f, no_storage).load()
        if not isinstance(keys, list) or set(keys) != set(storages):
            raise _Unreadable("the list of storages does not match the pickle")
        for key in keys:
            storage = storages[key]
            (count,) = struct.unpack("<q", _read_exactly(f, 8))
            nbytes = count * np.dtype(_STORAGE_DTYPES[storage.name]).itemsize
            if count < 0 or nbytes > size - f.tell():
                raise EOFError(
                    f"storage {key!r:.40} needs {nbytes} bytes, only {size - f.tell()} remain"
                )
            storage.elements = _elements(_read_exactly(f, nbytes), storage.name, "<")
    return result


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError("the file ends inside a storage")
    return data


# ---------------------------------------------------------------------- tensors
def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _to_numpy(tensor: _Tensor) -> np.ndarray:
    storage, offset, size, stride = tensor.storage, tensor.offset, tensor.size, tensor.stride
    if not isinstance(storage, _Storage):
        raise _Unreadable("a tensor without a storage")
    if not (
        _is_index(offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(_is_index(n) for n in size + stride)
    ):
        raise _Unreadable(
            f"a tensor with offset {offset!r:.40}, size {size!r:.80}, stride {stride!r:.80}"
        )
    elements = storage.array()
    if 0 in size:
        view = np.zeros(size, elements.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise _Unreadable(
                f"a tensor of size {size} needs element {last} of a storage of {elements.size}"
            )
        view = np.lib.stride_tricks.as_strided(
            elements[offset:],
            shape=size,
            strides=[s * elements.itemsize for s in stride],
            writeable=False,
        )
    if storage.name == "BoolStorage":
        return view != 0
    array = view.astype(elements.dtype.newbyteorder("="))  # a native-order copy
    if storage.name == "BFloat16Storage":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _materialise(value: Any) -> Any:
    if isinstance(value, _Tensor):
        return _to_numpy(value)
    if isinstance(value, dict):  # OrderedDict too; its `_metadata` attribute is dropped
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v) for v in value)
    if isinstance(value, (_Storage, _StorageType)):
        raise _Unreadable("a bare storage outside any tensor")
    return value


# ---------------------------------------------------------------------- entry point
def load(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path`, with tensors as NumPy arrays.

    Raises ValueError if the pickle references anything but tensors and plain containers (it is
    refused before anything is called), or if the file is not a readable PyTorch checkpoint.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)

    def unreadable(why: str) -> ValueError:
        return ValueError(f"cannot read {path}: not a readable PyTorch checkpoint ({why})")

    try:
        if not head:
            raise _Unreadable("the file is empty; it may be incomplete")
        if zipfile.is_zipfile(path):
            result = _load_zip(path)
        elif head.startswith(b"PK"):
            raise _Unreadable(
                "a zip archive without its directory at the end: it is cut short or damaged, "
                "so the file may be incomplete, e.g. an interrupted download"
            )
        else:  # the legacy format, or a bare pickle (which may be refused), or neither
            try:
                result = _load_legacy(path)
            except (_Refused, _Unreadable):
                raise
            except Exception:
                # Without a zip or a protocol 2-5 header, whatever the unpickler tripped on
                # (UnpicklingError, EOFError, OverflowError, ... as random bytes decide) the file
                # is not a checkpoint at all.
                if not _pickle_header(head):
                    raise _Unreadable("neither a zip archive nor a pickle") from None
                raise
        return _materialise(result)
    except _Refused as err:
        raise ValueError(
            f"{path} is not a plain PyTorch state dict: it references {err.args[0]}, which is "
            "refused (loading it could run code)"
        ) from None
    except _Unreadable as err:
        raise unreadable(err.args[0]) from None
    except (EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise unreadable(f"{_one_line(err)}; the file may be incomplete") from None
    except pickle.UnpicklingError as err:
        if "truncated" in str(err):
            raise unreadable(f"{_one_line(err)}; the file may be incomplete") from None
        raise unreadable(_one_line(err)) from None
    except Exception as err:  # TypeError from a malformed call, MemoryError, ...
        raise unreadable(_one_line(err)) from None


def _pickle_header(head: bytes) -> bool:
    """Whether `head` opens a pickle of protocol 2 to 5 (`torch.save` writes 2 by default)."""
    return len(head) >= 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
