"""Read torch's zip checkpoints (.ckpt/.pt/.bin) without running anything the file names.

torch.save writes a zip: <root>/data.pkl (the pickle) and <root>/data/<key> (raw storages).
Tensors are pickled as calls to torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...), storages as persistent ids ("storage", torch.HalfStorage, key, location, numel).

`read_torch_zip(path)` runs the pickle on a restricted unpickler (a subclass of Python's own
pickle machine, so each opcode that can touch an object is ours to check):

- every global the file names resolves to a value of OUR choosing: the small set of rebuild
  functions below (our code, not torch's), containers and plain data, or otherwise an inert
  StandIn class. It never imports a module the file names. Calling a StandIn - os.system(...),
  eval(...), SomeClass(args) - raises Refused, and so does a call with arguments a checkpoint
  never needs (bytes(2**31) asks for 2 GiB).
- BUILD (set an object's state) may only touch StandIn instances (and an OrderedDict's
  `_metadata`, which is dropped): never a class, a function or a tensor, whose state is shared
  with the whole process (BUILD on pathlib.PurePosixPath would break every Path in it).
- item and append opcodes only fill dicts, lists and sets the pickle made itself.
- every size is bounded by the file's real content: the pickle itself (MAX_PICKLE_BYTES), the
  objects it makes (MAX_OBJECTS), the nesting of tuples used as dict keys or set items
  (MAX_TUPLE_DEPTH: hashing a deeper tuple overflows the C stack), each zip entry (its compressed bytes must lie inside the file, a
  compressed entry may expand at most MAX_EXPANSION times), and the tensors: each one a view
  that lies inside its storage, all of them together at most VIEW_BUDGET times the file's size
  (a stride-0 view of one number could otherwise claim 16 GiB).

Broken or oversized files raise Corrupt, pickles that want to run code or touch the process
raise Refused; ldm.checkpoint.files (and ldm.runfiles, for a training run's checkpoints) turn both
into one-line errors naming the file.
"""
from __future__ import annotations

import io
import mmap
import pickle
import reprlib
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import Tensor

MAX_PICKLE_BYTES = 4 * 2**20      # SD 1.x data.pkl files are 0.1-1 MB (one entry per tensor)
MAX_OBJECTS = 500_000             # containers and calls the pickle may make (a few per tensor)
MAX_TUPLE_DEPTH = 100
MAX_EXPANSION = 16                # torch stores records uncompressed; weights deflate < 2x
VIEW_BUDGET = 2                   # all tensors' bytes <= 2 x file size + VIEW_SLACK (shared storages)
VIEW_SLACK = 16 * 2**20
_short = reprlib.Repr()           # bounded repr: a deeply nested argument cannot recurse
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlong = 3, 60, 60, 40


class Corrupt(Exception):
    """The file is broken, or claims more than its content can hold."""


class Refused(Exception):
    """The pickle tries to call code or to change an object it did not make; nothing ran."""


class _StandInMeta(type):
    def __call__(cls, *args, **kwargs):                 # REDUCE/INST call the global: refuse
        raise Refused(f"it calls {cls.__module__}.{cls.__qualname__}({', '.join(_short.repr(a) for a in args)})")


class StandIn(metaclass=_StandInMeta):
    """Inert placeholder for an object of a class a pickle names (e.g. a Lightning callback)."""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state, self.items = args, None, []
        return self

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):                 # a dict subclass's items (SETITEMS)
        self.items.append((key, value))

    def append(self, value):                           # a list subclass's items (APPENDS)
        self.items.append(value)

    def __repr__(self):
        return f"<StandIn for {type(self).__module__}.{type(self).__qualname__}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype                                 # torch.HalfStorage in a pickle -> float16


_STORAGES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}   # vars(): no lazy imports


def _latin1(text, encoding: str = "latin1") -> bytes:   # protocol 2 pickles bytes as _codecs.encode
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"it calls _codecs.encode({_short.repr(text)}, {_short.repr(encoding)})")
    return text.encode("latin1")


def _bytes_maker(cls):
    """bytes/bytearray as protocols 2-4 call them: from bytes, or from str + 'latin-1'. Never an
    integer (bytes(n) allocates n zero bytes) or anything else."""
    def make(*args):
        if not args:
            return cls()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return cls(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return cls(args[0], "latin1")
        raise Refused(f"it calls {cls.__name__}({', '.join(_short.repr(a) for a in args)})")
    return make


def _ints(value, what: str) -> tuple[int, ...]:
    if not (isinstance(value, (tuple, list)) and len(value) <= 64
            and all(type(v) is int and v >= 0 for v in value)):
        raise Corrupt(f"a tensor's {what} is {_short.repr(value)}, not a tuple of non-negative integers")
    return tuple(value)


_NEWOBJ_OK = (OrderedDict, set, frozenset, PurePosixPath, PureWindowsPath)


class RestrictedUnpickler(pickle._Unpickler):       # Python's pickle machine: opcodes we can override
    """Unpickle tensors and plain data; see the module docstring for what it refuses."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, load_storage, view_budget: int):
        super().__init__(file)
        self.load_storage, self.stand_ins = load_storage, set()
        self.view_bytes, self.view_budget, self.objects = 0, view_budget, 0
        self.depths: dict[int, tuple[object, int]] = {}   # id -> (tuple, nesting depth); keeps it alive
        self.safe_globals = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad=False, hooks=None: data,
            ("torch._utils", "_rebuild_parameter_with_state"): lambda data, requires_grad, hooks, state: data,
            ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
            ("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): _latin1,
            ("builtins", "bytes"): _bytes_maker(bytes), ("builtins", "bytearray"): _bytes_maker(bytearray),
            ("builtins", "frozenset"): lambda items=(): self._nested(frozenset(self._hashable(items))),
            ("builtins", "set"): lambda items=(): set(self._hashable(items)),
            **{("builtins", b.__name__): b for b in (complex, slice)},
            **{("pathlib", n): PurePosixPath for n in ("PosixPath", "PurePosixPath")},
            **{("pathlib", n): PureWindowsPath for n in ("WindowsPath", "PureWindowsPath")},
        }

    # -- globals and storages
    def find_class(self, module, name):
        if module == "__builtin__":                    # protocol 0-2 pickles use Python 2's module name
            module = "builtins"
        if (module, name) in self.safe_globals:
            return self.safe_globals[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGES:
            return _StorageType(_STORAGES[name])       # a marker, not callable
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]                       # torch.float16 etc.: values, not callable
        self.stand_ins.add(f"{module}.{name}")
        return _StandInMeta(name, (StandIn,), {"__module__": module, "__qualname__": name})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise Corrupt(f"unexpected persistent id {_short.repr(pid)}")
        return self.load_storage(pid[2], pid[1].dtype, pid[4])

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not (isinstance(storage, Tensor) and storage.ndim == 1 and type(offset) is int and offset >= 0):
            raise Corrupt(f"_rebuild_tensor_v2 got storage {_short.repr(storage)} and offset {_short.repr(offset)}")
        size, stride = _ints(size, "size"), _ints(stride, "stride")
        if len(size) != len(stride):
            raise Corrupt(f"a tensor's size {size} and stride {stride} differ in length")
        numel = 1
        for s in size:
            numel *= s
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if numel else offset - 1
        if last >= storage.numel():
            raise Corrupt(f"a tensor of size {size}, stride {stride}, offset {offset} reaches past its "
                          f"storage of {storage.numel()} elements")
        self.view_bytes += numel * storage.element_size()
        if self.view_bytes > self.view_budget:
            raise Corrupt(f"its tensors claim more than {self.view_budget} bytes, more than the file can "
                          f"hold (a view of size {size}, stride {stride} repeats a smaller storage)")
        return storage.as_strided(size, stride, offset)

    # -- opcodes that touch an object: only the ones the pickle made, only plain containers
    def _count(self):
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise Corrupt(f"the pickle makes more than {MAX_OBJECTS} objects")

    def _nested(self, obj):
        """Record a tuple's / frozenset's nesting depth (hashing recurses through both)."""
        depth = 1 + max((self.depths[id(x)][1] if id(x) in self.depths else isinstance(x, (tuple, frozenset))
                         for x in obj), default=0)
        if depth > 1:
            self.depths[id(obj)] = (obj, depth)
        return obj

    def _hashable(self, items):
        """Refuse to hash a tuple nested deeper than MAX_TUPLE_DEPTH: CPython's tuple hash recurses
        without a guard and a 10**5-deep one overflows the C stack (a crash, not an exception)."""
        for x in items:
            if id(x) in self.depths and self.depths[id(x)][1] > MAX_TUPLE_DEPTH:
                raise Corrupt(f"a dict key or set item of tuples nested deeper than {MAX_TUPLE_DEPTH}")
        return items

    def _target(self, kinds, opcode: str):
        obj = self.stack[-1]
        if not isinstance(obj, kinds):
            raise Refused(f"it fills {_what(obj)} ({opcode}; only containers the pickle made may be filled)")
        return obj

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, StandIn):
            inst.__setstate__(state)
        elif not (type(inst) is OrderedDict and isinstance(state, dict)):   # state_dict()._metadata: dropped
            raise Refused(f"it sets the state of {_what(inst)} (BUILD; only inert stand-ins may get state)")
    dispatch[pickle.BUILD[0]] = load_build

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target((dict, StandIn), "SETITEM")[self._hashable((key,))[0]] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target((dict, StandIn), "SETITEMS")
        self._hashable(items[0::2])
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_append(self):
        value = self.stack.pop()
        self._target((list, StandIn), "APPEND").append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        target = self._target((list, StandIn), "APPENDS")
        for item in items:
            target.append(item)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_additems(self):
        items = self.pop_mark()
        self._target(set, "ADDITEMS").update(self._hashable(items))
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_newobj(self):
        args, cls = self.stack.pop(), self.stack.pop()
        if not (isinstance(cls, type) and (issubclass(cls, StandIn) or cls in _NEWOBJ_OK)):
            raise Refused(f"it makes an instance of {_what(cls)} (NEWOBJ)")
        self._count()
        self.append(cls.__new__(cls, *args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        if kwargs:
            raise Refused(f"it makes an object with keyword arguments {_short.repr(kwargs)} (NEWOBJ_EX)")
        self.load_newobj()
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_frozenset(self):
        self.append(frozenset(self._hashable(self.pop_mark())))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def _counted(handler, nesting: bool):              # wraps an opcode that makes an object
        def load(self):
            self._count()
            handler(self)
            if nesting:
                self._nested(self.stack[-1])
        return load

    _NESTING = (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET)
    for _op in (pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_SET, pickle.LIST, pickle.DICT, *_NESTING,
                pickle.REDUCE, pickle.INST, pickle.OBJ, pickle.BINPERSID, pickle.PERSID, pickle.MARK):
        dispatch[_op[0]] = _counted(dispatch[_op[0]], _op in _NESTING)
    del _op, _counted, _NESTING


def _what(obj) -> str:
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        return f"the {'class' if isinstance(obj, type) else 'function'} {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int, limit: int) -> bytes:
    """One zip entry's bytes, its declared sizes checked against the file before any read."""
    if info.header_offset + info.compress_size > file_size:
        raise Corrupt(f"zip entry {info.filename} declares {info.compress_size} bytes, past the end of "
                      f"the {file_size}-byte file (truncated?)")
    if info.file_size > limit:
        raise Corrupt(f"zip entry {info.filename} declares {info.file_size} bytes; at most {limit} allowed")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_EXPANSION * info.compress_size + 4096:
        raise Corrupt(f"zip entry {info.filename} would expand {info.compress_size} bytes to {info.file_size} "
                      f"(more than {MAX_EXPANSION}x)")
    with zf.open(info) as f:
        data = f.read(info.file_size)                  # bounded read: never more than declared
    if len(data) != info.file_size:
        raise Corrupt(f"zip entry {info.filename} holds {len(data)} of its {info.file_size} bytes (truncated?)")
    return data


def read_torch_zip(path: Path) -> tuple[object, list[str]]:
    """(the object a torch.save zip holds, the classes replaced by stand-ins). Tensors are
    copy-on-write views of the file's pages."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        file_size = Path(path).stat().st_size
        names = set(zf.namelist())
        pkl = next((n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if pkl is None:
            raise Corrupt("a zip archive without data.pkl, not a torch checkpoint")
        root = pkl[: -len("data.pkl")]
        if f"{root}byteorder" in names and _entry(zf, zf.getinfo(f"{root}byteorder"), file_size, 16) != b"little":
            raise Corrupt("a big-endian torch checkpoint; only little-endian is supported")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # pages are read when first touched
        storages: dict[str, Tensor] = {}

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> Tensor:
            if key in storages:
                return storages[key]
            name = f"{root}data/{key}"
            if name not in names:
                raise Corrupt(f"the pickle names storage {key!r}, which the archive does not hold")
            info = zf.getinfo(name)
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            if numel < 0 or nbytes > info.file_size:
                raise Corrupt(f"storage {key} holds {info.file_size} bytes, the pickle wants {nbytes}")
            if numel == 0:
                storages[key] = torch.empty(0, dtype=dtype)
            elif info.compress_type == zipfile.ZIP_STORED:   # torch stores records uncompressed
                if info.header_offset + 30 > len(mm):
                    raise Corrupt(f"storage {key} starts past the end of the file (truncated?)")
                name_len, extra_len = struct.unpack("<26xHH", mm[info.header_offset: info.header_offset + 30])
                start = info.header_offset + 30 + name_len + extra_len
                if start + nbytes > len(mm):
                    raise Corrupt(f"storage {key} runs past the end of the file (truncated?)")
                storages[key] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=start)
            else:
                data = bytearray(_entry(zf, info, file_size, MAX_EXPANSION * file_size))
                storages[key] = torch.frombuffer(data, dtype=dtype, count=numel)
            return storages[key]

        data = _entry(zf, zf.getinfo(pkl), file_size, MAX_PICKLE_BYTES)
        unpickler = RestrictedUnpickler(io.BytesIO(data), load_storage, VIEW_BUDGET * file_size + VIEW_SLACK)
        obj = unpickler.load()
    return obj, sorted(unpickler.stand_ins)
