"""Where decoded module bytes become torch tensors, on the CPU or any torch device. The only module importing torch.

Three placers share one interface: a worker thread calls ``stage`` (decode a verified record into a
host buffer; runs in parallel, zstd releases the GIL) and the consuming thread calls ``finish``
(turn the staged bytes into tensors on the device).

* :class:`CPUPlacer` decodes straight into the module's final buffer: tensors are views of it,
  no copy after decoding.
* :class:`CUDAPlacer` decodes the byte planes into a reusable pinned staging buffer, copies them
  to the device with ``non_blocking`` on a side stream while workers decode the next records, and
  un-groups the planes on the GPU, so tensors are created on the device with no CPU-side copy.
  Host memory stays at a few staging buffers, whatever the LoRA's size.
* :class:`CopyPlacer`, for any other device torch has (Apple's ``mps``, ``xpu``, …), decodes as
  the CPU placer does and copies each tensor to the device.
"""

from __future__ import annotations

import mmap
import queue
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import torch

from lorachunk._codec import BytePlaneZstd, Codec, plane_groups, tiled_itemsize
from lorachunk._exceptions import UsageError
from lorachunk._manifest import Module, TensorEntry
from lorachunk._record import decode_checked_run

__all__ = ["CPUPlacer", "CUDAPlacer", "CopyPlacer", "Placer", "make_placer", "require_dtypes", "scale_", "scale_bytes"]

#: safetensors dtype → torch dtype name. Older torch builds lack the newest (uint16/32/64 came in
#: 2.3, float8_e8m0fnu in 2.7); LoRAs rarely use them, so such a build loads every other LoRA.
_TORCH_NAMES: Final = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}
DTYPES: Final[dict[str, torch.dtype]] = {
    name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items() if hasattr(torch, attr)
}


def require_dtypes(dtypes: Iterable[str]) -> None:
    """:class:`UsageError` naming the dtypes this torch build cannot hold, before any fetch."""
    missing = sorted(set(dtypes) - DTYPES.keys())
    if missing:
        raise UsageError(
            f"torch {torch.__version__} has no dtype for {', '.join(missing)}: "
            "upgrade torch, or select the tensors of other dtypes (keys=, modules=)"
        )


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r}")
    return found


def _tensor(
    buffer: torch.Tensor, entry: TensorEntry, typed: dict[torch.dtype, torch.Tensor] | None = None
) -> torch.Tensor:
    """``entry``'s tensor over ``buffer`` (a module's bytes). ``typed`` keeps the buffer viewed as
    each dtype met so far: a strided view of it is one torch call instead of three, which is
    what a LoRA of thousands of small tensors spends its time on."""
    itemsize = entry.itemsize
    if (
        typed is not None
        and itemsize
        and not (entry.offset % itemsize or buffer.numel() % itemsize or buffer.storage_offset() % itemsize)
    ):
        dtype = DTYPES[entry.dtype]
        whole = typed.get(dtype)
        if whole is None:
            whole = typed[dtype] = buffer.view(dtype)
        return whole.as_strided(entry.shape, _strides(entry.shape), whole.storage_offset() + entry.offset // itemsize)
    piece = buffer[entry.offset : entry.offset + entry.length]
    if entry.offset % max(1, entry.itemsize):
        piece = piece.clone()  # a tensor after an odd-sized one: views must be aligned
    return piece.view(DTYPES[entry.dtype]).reshape(entry.shape)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, in elements (remembered: a LoRA has a
    few shapes and thousands of tensors)."""
    known = _STRIDES.get(shape)
    if known is not None:
        return known
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    if len(_STRIDES) < 4096:
        _STRIDES[shape] = tuple(reversed(strides))
    return tuple(reversed(strides))


_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}


def _bytes_view(buffer: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous uint8 CPU tensor, for zstd to decode into."""
    return buffer.numpy().data


def scale_(tensor: torch.Tensor, factor: float) -> None:
    """Multiply in place, computing in float32 so half-precision tensors round once."""
    if tensor.dtype in (torch.float32, torch.float64):
        tensor.mul_(factor)
    else:
        tensor.copy_(tensor.to(torch.float32).mul_(factor))


def scale_bytes(buffer: bytearray, entry: TensorEntry, factor: float) -> bool:
    """Multiply, in place and in float32, the tensor that ``entry`` locates in ``buffer``; False,
    and ``buffer`` left as it was, when a finite value would overflow the dtype (inf in a file
    is a broken LoRA, not a strong one)."""
    whole = torch.frombuffer(buffer, dtype=torch.uint8)
    tensor = _tensor(whole, entry).clone()  # scaled apart: the buffer changes only if all fits
    finite = torch.isfinite(tensor)
    scale_(tensor, factor)
    if not bool((torch.isfinite(tensor) | ~finite).all()):
        return False
    whole[entry.offset : entry.offset + entry.length].copy_(tensor.reshape(-1).view(torch.uint8))
    return True


@dataclass(frozen=True, slots=True)
class Staged:
    """A decoded module waiting for :meth:`Placer.finish`."""

    module: Module
    buffer: torch.Tensor
    keys: frozenset[str] | None
    slot: _Slot | None = None
    placed: list[tuple[str, torch.Tensor]] | None = None


class Placer:
    """Turns verified stored bytes into tensors on one device."""

    device: torch.device
    #: Whether staged buffers hold the decoded module bytes on the host (then the cache can keep them).
    keeps_host_bytes: bool = False
    #: Whether :meth:`stage_run` decodes a run of records at once (else the loader stages each).
    stages_runs: bool = False

    def __init__(self, codec: Codec, device: torch.device, dtype: torch.dtype | None) -> None:
        self.codec = codec
        self.device = device
        self.dtype = dtype

    def stage(self, module: Module, stored: bytes | memoryview, keys: frozenset[str] | None) -> Staged:
        raise NotImplementedError

    def stage_run(self, modules: Sequence[Module], stored: memoryview, keys: frozenset[str] | None) -> list[Staged]:
        """:meth:`stage` for records stored back to back in ``stored``."""
        raise NotImplementedError

    def adopt(self, module: Module, raw: mmap.mmap | bytes | memoryview, keys: frozenset[str] | None) -> Staged:
        raise NotImplementedError

    def finish(self, staged: Staged) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def tensors(
        self, module: Module, buffer: torch.Tensor, keys: frozenset[str] | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        typed: dict[torch.dtype, torch.Tensor] = {}
        for entry in module.tensors:
            if keys is not None and entry.key not in keys:
                continue
            tensor = _tensor(buffer, entry, typed)
            if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
            yield entry.key, tensor

    def close(self) -> None:
        """Wait for outstanding copies and release staging buffers."""


class CPUPlacer(Placer):
    keeps_host_bytes = True
    stages_runs = True

    def stage(self, module: Module, stored: bytes | memoryview, keys: frozenset[str] | None) -> Staged:
        return self.stage_run([module], memoryview(stored), keys)[0]

    def stage_run(self, modules: Sequence[Module], stored: memoryview, keys: frozenset[str] | None) -> list[Staged]:
        # A buffer per module, not one per run: a run's buffer would stay alive while any one of
        # its tensors does, and measured no faster.
        pieces = [torch.empty(m.raw_size, dtype=torch.uint8) for m in modules]
        decode_checked_run(
            self.codec, modules, stored, [_bytes_view(p) if p.numel() else memoryview(bytearray()) for p in pieces]
        )
        # Tensors are made here, on the worker: with many tiny tensors the per-tensor torch calls
        # cost more than decoding, and the consuming thread would otherwise do them all alone.
        return [
            Staged(m, piece, keys, placed=list(self.tensors(m, piece, keys)))
            for m, piece in zip(modules, pieces, strict=True)
        ]

    def adopt(self, module: Module, raw: mmap.mmap | bytes | memoryview, keys: frozenset[str] | None) -> Staged:
        """Tensors over already decoded and checked bytes (a cache entry's memory map), no copy."""
        buffer = torch.frombuffer(raw, dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
        return Staged(module, buffer, keys, placed=list(self.tensors(module, buffer, keys)))

    def finish(self, staged: Staged) -> Iterator[tuple[str, torch.Tensor]]:
        assert staged.placed is not None
        return iter(staged.placed)


class CopyPlacer(CPUPlacer):
    """Decodes on the host, then copies each tensor to a device without a path of its own here."""

    def finish(self, staged: Staged) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in super().finish(staged):
            try:
                yield key, tensor.to(self.device)
            except (RuntimeError, TypeError) as exc:  # e.g. mps has no float64
                raise UsageError(f"cannot place {key!r} ({tensor.dtype}) on {self.device}: {exc}") from exc


class _Slot:
    """A pinned host buffer and the event that says its last copy to the device is done."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.event: torch.cuda.Event | None = None

    def reserve(self, size: int) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 2 * self.buffer.numel()), dtype=torch.uint8, pin_memory=True)
        return self.buffer[:size]


class CUDAPlacer(Placer):
    def __init__(self, codec: Codec, device: torch.device, dtype: torch.dtype | None) -> None:
        super().__init__(codec, device, dtype)
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()

    def stage(self, module: Module, stored: bytes | memoryview, keys: frozenset[str] | None) -> Staged:
        # Never wait for a slot: the thread that would free one may be the one asking for it.
        # The pool grows to the number of modules in flight, which the loader bounds.
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            slot = _Slot()
        try:
            host = slot.reserve(module.raw_size)
            view = _bytes_view(host) if module.raw_size else memoryview(bytearray())
            if isinstance(self.codec, BytePlaneZstd):
                self.codec.decode_planes(memoryview(stored), module.segments, module.frames, view)
            else:
                self.codec.decode(memoryview(stored), module.segments, module.frames, view)
        except BaseException:
            self._free.put(slot)
            raise
        return Staged(module, host, keys, slot)

    def finish(self, staged: Staged) -> Iterator[tuple[str, torch.Tensor]]:
        module, slot, keys = staged.module, staged.slot, staged.keys
        assert slot is not None
        with torch.cuda.stream(self.stream):
            planes = torch.empty(module.raw_size, dtype=torch.uint8, device=self.device)
            planes.copy_(staged.buffer, non_blocking=True)
            slot.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            slot.event.record(self.stream)
            self._free.put(slot)
            raw = _ungroup(planes, module) if isinstance(self.codec, BytePlaneZstd) else planes
            placed = list(self.tensors(module, raw, keys))
        # Tensors were made on the side stream; the caller's stream must not read them early,
        # and the allocator must not reuse their memory while the side stream still writes it.
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for _, tensor in placed:
            tensor.record_stream(current)
        return iter(placed)

    def close(self) -> None:
        self.stream.synchronize()


def _ungroup(planes: torch.Tensor, module: Module) -> torch.Tensor:
    """Byte planes (as :meth:`BytePlaneZstd.decode_planes` lays them out) back to tensor bytes, on the device."""
    itemsize = tiled_itemsize(module.segments, planes.numel())
    if itemsize:
        # The usual module (one dtype, tensors back to back): un-grouping is one transpose, and
        # the result is already in tensor order. Per-module kernel launches are what the GPU path
        # pays for, so this saves most of them.
        return planes.view(itemsize, -1).t().contiguous().view(-1)
    raw = torch.empty_like(planes)
    position = 0
    for itemsize, segments, count in plane_groups(module.segments):
        size = itemsize * count
        elements = planes[position : position + size].view(itemsize, count).t().contiguous().view(-1)
        position += size
        start = 0
        for segment in segments:
            raw[segment.offset : segment.offset + segment.length] = elements[start : start + segment.length]
            start += segment.length
    return raw


def make_placer(
    codec: Codec, device: str | torch.device, dtype: torch.dtype | str | None, *, check_raw: bool = False
) -> Placer:
    """The placer for ``device``. ``check_raw``: every module's raw bytes must be checked against
    its raw digest (the LoRA is pinned by its root only, which does not pin the records), so a
    CUDA load decodes on the host, checks, and copies, instead of un-grouping on the device."""
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"invalid device {device!r}: {exc}") from exc
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but torch sees no CUDA device")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if check_raw:
            return CopyPlacer(codec, target, parse_dtype(dtype))
        return CUDAPlacer(codec, target, parse_dtype(dtype))
    if target.type == "cpu":
        return CPUPlacer(codec, target, parse_dtype(dtype))
    try:
        torch.empty(0, device=target)  # fails now, not after the first record, where torch lacks the backend
    except (RuntimeError, AssertionError, ImportError) as exc:
        # torch's own message for a missing backend runs to a page; its first line says why.
        raise UsageError(f"device {device!r} is not available here: {str(exc).splitlines()[0]}") from exc
    return CopyPlacer(codec, target, parse_dtype(dtype))
