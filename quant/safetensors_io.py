"""Safetensors reading and writing, one tensor at a time.

Our own header parser instead of `safetensors.safe_open`: it validates everything a lying or
truncated file can get wrong and names the file and tensor in each error, and it lets the
quantizer read a tensor, convert it and drop it, so the whole model never sits in memory.
Only the safetensors format is accepted; pickles are refused, never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# JSON objects in a header: one per tensor, plus one per quantized layer inside `_quantization_metadata`.
# The LTX-2.3 release holds about 5,000 tensors (quantized: about 15,000 entries in all); the limit is an
# eighth of the 1.6 million entries that took 28 s and 2 GB to inspect.
MAX_HEADER_OBJECTS = 200_000
MAX_JSON_DEPTH = 64  # header, config, quantization metadata and calibration files are 2-4 levels deep
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: every offset, shape and count fits
MAX_TENSOR_DIMS = 16  # no model tensor has more than 6
MAX_INDEX = 2 ** 63 - 1  # torch indexes bytes with int64: a larger shape, even of a zero-size tensor, cannot exist
# Write errors that mean "no room": a full disk, a quota, a file size limit.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A file that is not a valid (or not the expected) checkpoint. The message names the file."""


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits:,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def json_depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str | bytes, object_pairs_hook=None, check_depth: bool = True):
    """JSON from a file, within the limits above: a ValueError saying what is wrong instead of a
    RecursionError, Python's int-conversion error or (`check_depth`) a structure nested past
    MAX_JSON_DEPTH. NaN and Infinity parse (as Python's json does); the caller checks the numbers it
    uses."""
    try:
        value = json.loads(text, parse_int=_bounded_int, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at {e.pos})") from None
    except RecursionError:  # Python's parser stops near 1,000 levels
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if check_depth and json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else an OSError saying what it is: reading
    a FIFO blocks until some writer comes, forever, and a device never ends. The open itself does
    not block (O_NONBLOCK); the file is switched back to blocking reads once known to be regular."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs that block an open
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_file_kind(mode)}, not a regular file; only regular files are read")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the data
    nbytes: int

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def _sniff_foreign(head: bytes) -> str | None:
    if head[:2] == b"PK":
        return "a zip archive such as a PyTorch .pt/.ckpt pickle; pickles are never loaded"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle; pickles are never loaded"
    if head[:4] == b"GGUF":
        return "a GGUF file"
    return None


class SafetensorsFile:
    """A validated view of a safetensors file's header; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._file: BinaryIO = open_regular(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror}") from e
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _parse(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        # A valid file's first bytes are a little-endian length that can look like anything, so
        # other formats are named only to explain a header that does not parse.
        foreign = _sniff_foreign(head)
        hint = f" (it looks like {foreign})" if foreign else ""
        if size < 8 or len(head) < 8:
            raise self._fail(f"not a safetensors file: {size} bytes, too short for a header{hint}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(f"not a safetensors file or corrupt: header length {header_len} exceeds "
                             f"{MAX_HEADER_BYTES}{hint}")
        if 8 + header_len > size:
            raise self._fail(f"truncated or not a safetensors file: header claims {header_len} bytes but the file "
                             f"has {size - 8} after the length field{hint}")
        raw = self._file.read(header_len)
        # Every JSON object starts with a literal '{' (braces inside strings only add to the count):
        # counted before parsing, which costs seconds and gigabytes for millions of entries.
        objects = raw.count(b"{")
        if objects > MAX_HEADER_OBJECTS:
            raise self._fail(f"corrupt header: {objects:,} JSON objects, more than the {MAX_HEADER_OBJECTS:,} "
                             f"any model file needs (one per tensor){hint}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"corrupt header: not UTF-8 ({e.reason} at byte {e.start}){hint}") from None
        # No depth walk over up to 200,000 entries: each entry's structure is checked below, and
        # nesting anywhere else is never read.
        try:
            header = parse_json(text, object_pairs_hook=self._no_duplicates, check_depth=False)
        except CheckpointError:
            raise
        except ValueError as e:
            raise self._fail(f"not a safetensors file or corrupt header: {e}{hint}") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header: top level is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("corrupt header: __metadata__ must map strings to strings")
        for key in metadata:
            self._check_name("__metadata__ key", key)
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self._check_name("tensor name", name)
            tensors[name] = self._tensor_info(name, entry, data_len)
        self._check_coverage(tensors, data_len)
        self.tensors = tensors

    def _check_name(self, what: str, name: str) -> None:
        """Names are printed and copied into outputs: a terminal escape or a newline in one would be
        sent to the user's terminal, or into the file ComfyUI lists, as it is."""
        if not name.isprintable():
            raise self._fail(f"corrupt header: {what} {name!r} holds control characters")

    def _check_coverage(self, tensors: dict[str, TensorInfo], data_len: int) -> None:
        """The tensors tile the data section exactly, as the safetensors library requires (ComfyUI's
        core loaders refuse the file otherwise): no overlap, no gap, nothing after the last tensor."""
        ranges = sorted((t.start - self.data_start, t.start - self.data_start + t.nbytes, t.name)
                        for t in tensors.values() if t.nbytes)
        for (_s0, e0, n0), (s1, _e1, n1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                raise self._fail(f"corrupt header: tensors {n0!r} and {n1!r} overlap in the file")
            if s1 > e0:
                raise self._fail(f"corrupt header: {s1 - e0:,} bytes between tensors {n0!r} and {n1!r} belong to "
                                 "no tensor (the header lies or lost an entry)")
        first = ranges[0][0] if ranges else data_len
        if first:
            raise self._fail(f"corrupt header: the first {first:,} bytes of the data section belong to no tensor "
                             "(the header lies or lost an entry)")
        end = ranges[-1][1] if ranges else 0
        if end != data_len:
            raise self._fail(f"corrupt file: {data_len - end:,} bytes after the last tensor belong to no tensor "
                             "(something was appended, or the header lost an entry)")

    def _no_duplicates(self, pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise self._fail(f"corrupt header: tensor {twice!r} appears twice")
        return obj

    def _tensor_info(self, name: str, entry, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"corrupt header: entry for tensor {name!r} is not an object")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise self._fail(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise self._fail(f"tensor {name!r}: invalid shape {shape!r}")
        if len(shape) > MAX_TENSOR_DIMS:
            raise self._fail(f"tensor {name!r}: {len(shape)} dimensions, more than the {MAX_TENSOR_DIMS} this "
                             "reader takes")
        extent = DTYPES[dtype_name].itemsize
        for d in shape:
            extent *= max(d, 1)
        if extent > MAX_INDEX:
            raise self._fail(f"tensor {name!r}: shape {shape} spans more than 2^63 bytes, which no tensor can "
                             "(the header is damaged)")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise self._fail(f"tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * dtype.itemsize
        if not 0 <= begin <= end:
            raise self._fail(f"tensor {name!r}: data_offsets {offsets} are reversed or negative")
        if end - begin != expected:
            raise self._fail(f"tensor {name!r}: header says {end - begin} bytes but {dtype_name} "
                             f"{shape} needs {expected}")
        if end > data_len:
            raise self._fail(f"truncated: tensor {name!r} ends at byte {end} of the data section but the file "
                             f"holds only {data_len} (file cut short or header lies)")
        return TensorInfo(name, dtype, tuple(shape), self.data_start + begin, expected)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into fresh CPU memory (the only copy; nothing is cached), or into the
        start of `into`, a uint8 CPU buffer of at least its size (the result is a view of it)."""
        info = self.tensors.get(name)
        if info is None:
            raise self._fail(f"no tensor {name!r}")
        if into is None:
            raw = torch.empty(info.nbytes, dtype=torch.uint8)  # torch-owned memory, read into in place
        else:
            raw = into[:info.nbytes]
        self._file.seek(info.start)
        got = self._file.readinto(memoryview(raw.numpy())) if info.nbytes else 0
        if got != info.nbytes:
            raise self._fail(f"truncated while reading tensor {name!r}: got {got} of {info.nbytes} bytes")
        return raw.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _header_bytes(path: str, specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section like the reference writer
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: the header would take {len(raw):,} bytes, more than the {MAX_HEADER_BYTES:,} "
                         "that safetensors readers (this pack's included) accept; nothing was written")
    return struct.pack("<Q", len(raw)) + raw


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, needed_bytes: int = 0, suffix: str = ""):
    """A binary file object for `path` written atomically: the bytes go to a temp file in the target
    folder which is fsynced and renamed into place only when the block ends without error. Any error
    (including KeyboardInterrupt) removes the temp file; an existing file is never touched unless
    `overwrite`. Running out of room mid-write is an OSError that names `path`."""
    path = os.fspath(path)
    check_output(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    free = _free_bytes(folder)
    if free is not None and free < needed_bytes:
        raise OSError(f"{path}: needs {needed_bytes:,} bytes but only {free:,} are free in {folder}")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; model files are shared like any other
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as e:
        _remove(tmp)
        if e.errno in NO_ROOM_ERRNOS:
            raise OSError(e.errno, f"{path}: no room left while writing ({e.strerror}); the partial file was "
                                   f"removed and nothing was written. Free space in {folder} and try again.") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def check_output_path(path: str) -> None:
    """An OSError naming `path` when it cannot take a file written by atomic_file: no name, a folder
    or other non-regular file in its place (replacing a FIFO or a device node would turn it into a
    file), a folder that does not exist, or a name the filesystem cannot hold; checked before anything
    is computed or written."""
    name = os.path.basename(path)
    if not name or name in (".", "..") or path.endswith(("/", os.sep)):
        raise OSError(errno.EINVAL, f"{path!r}: not a file name (it names a folder or nothing)")
    try:
        os.fsencode(path)
    except UnicodeError:
        raise OSError(errno.EINVAL, f"{path!r}: the file system cannot hold this name (it has characters that "
                                    "are not text, such as a lone surrogate)") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(errno.ENOENT, f"{path}: the folder {folder} does not exist")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # Windows has no pathconf; NTFS names hold 255 characters
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise OSError(errno.ENAMETOOLONG, f"{path}: the file name is too long ({len(os.fsencode(name))} bytes; "
                                          f"names in {folder} hold at most {limit})")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot check the output ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"{path}: is {_file_kind(mode)}; refusing to replace it with a file")


def check_output(path: str, overwrite: bool) -> None:
    """check_output_path, and a FileExistsError for an existing file unless `overwrite`."""
    check_output_path(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite")


def _remove(tmp: str) -> None:
    if os.path.exists(tmp):
        os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself survive a crash (POSIX). Windows cannot open a folder, and some
    filesystems refuse to fsync one: the file itself is already on disk then."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_streaming(path: str | os.PathLike, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                    metadata: dict[str, str] | None = None, overwrite: bool = False) -> int:
    """Write tensors, produced one at a time in `specs` order, atomically (see atomic_file).
    Returns the number of bytes written."""
    header = _header_bytes(os.fspath(path), specs, metadata)
    total = len(header) + sum(s.nbytes for s in specs)
    # Not ".safetensors": a temp file left by a killed process must not show up in ComfyUI's model lists.
    with atomic_file(path, overwrite, total, ".safetensors.part") as out:
        out.write(header)
        produced = iter(tensors)
        for spec in specs:
            tensor = next(produced, None)
            if tensor is None:
                raise RuntimeError(f"{path}: writer got no tensor for {spec.name!r}")
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise RuntimeError(f"{path}: tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                   f"planned {spec.dtype} {spec.shape}")
            if spec.nbytes:
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        if next(produced, None) is not None:  # also lets the producer finish (final progress)
            raise RuntimeError(f"{path}: more tensors produced than planned")
    return total


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool) -> None:
    """A small text file (calibration JSON, quality reports), written atomically."""
    with atomic_file(path, overwrite, suffix=".tmp") as out:
        out.write(text.encode("utf-8"))


def _free_bytes(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None, overwrite: bool = False) -> int:
    """Atomic write of an in-memory dict (small files, tests, calibration output)."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_streaming(path, specs, (tensors[s.name] for s in specs), metadata, overwrite)



class MemoryTensors:
    """An in-memory state dict with the read interface of SafetensorsFile, so that the checkpoint
    code (inspection, conversion planning) serves models already loaded by other means."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 path: str = "<model in memory>"):
        self.path = path
        self.metadata = dict(metadata or {})
        self._data = tensors
        self.tensors = {name: TensorInfo(name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                        for name, t in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._data)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def read(self, name: str) -> torch.Tensor:
        return self._data[name]

    def __enter__(self) -> "MemoryTensors":
        return self

    def __exit__(self, *exc) -> None:
        pass
