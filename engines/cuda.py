"""Checked CUDA runtime calls through cuda-python: device query, memory, copies, streams, graphs.

Every cuda-python call returns ``(status, *results)``; ``check`` turns a non-success status into a
CudaError naming the call and the CUDA error, so no failure passes silently. Device memory,
streams and graphs are released by ``weakref.finalize``: explicitly through ``DeviceBuffer.free()``
or when their owner is collected, but not at interpreter exit, where the process's end releases
them and the CUDA runtime may already be unloading. A failure while releasing is reported through
``warnings`` because finalizers cannot raise.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from taming_deploy.engines import deps
from taming_deploy.errors import UserError


class CudaError(UserError):
    """A CUDA runtime call failed (no driver, out of memory, a failed kernel, ...)."""


def check(result: tuple, call: str) -> Any:
    """``result`` = (status, *values) from a cuda-python call -> the values (None, one, or a tuple)."""
    rt = deps.cudart()
    status, values = result[0], result[1:]
    if status != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(status)[1]
        text = rt.cudaGetErrorString(status)[1]
        decode = lambda b: b.decode() if isinstance(b, bytes) else str(b)  # noqa: E731
        raise CudaError(f"CUDA call {call} failed: {decode(name)} ({decode(text)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_clock_khz: int
    memory_bus_bits: int
    total_memory: int


def device_info() -> GpuInfo:
    """The current CUDA device; a CudaError (a UserError) when there is no usable GPU or driver."""
    rt = deps.cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count == 0:
        raise CudaError("no CUDA device found: TensorRT engines need an NVIDIA GPU")
    device = check(rt.cudaGetDevice(), "cudaGetDevice")
    props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    attr = lambda a: check(rt.cudaDeviceGetAttribute(a, device), "cudaDeviceGetAttribute")  # noqa: E731
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode()
    return GpuInfo(
        name=str(name).strip(),
        compute_capability=(int(props.major), int(props.minor)),
        memory_clock_khz=int(attr(rt.cudaDeviceAttr.cudaDevAttrMemoryClockRate)),
        memory_bus_bits=int(attr(rt.cudaDeviceAttr.cudaDevAttrGlobalMemoryBusWidth)),
        total_memory=int(props.totalGlobalMem),
    )


def _finalizer(owner: object, call: Callable[[], tuple], name: str) -> weakref.finalize:
    finalizer = weakref.finalize(owner, _release, call, name)
    finalizer.atexit = False
    return finalizer


def _release(call: Callable[[], tuple], name: str) -> None:
    try:
        check(call(), name)
    except CudaError as exc:
        warnings.warn(str(exc), RuntimeWarning, stacklevel=1)


class Stream:
    """A non-default CUDA stream (graph capture needs one)."""

    def __init__(self) -> None:
        rt = deps.cudart()
        self._rt = rt
        self.handle = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        _finalizer(self, lambda h=self.handle: rt.cudaStreamDestroy(h), "cudaStreamDestroy")

    @property
    def ptr(self) -> int:
        """The cudaStream_t as an integer, the form TensorRT's execute_async_v3 takes."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


class DeviceBuffer:
    """``nbytes`` of device memory (at least 1 byte, so every tensor gets a valid address)."""

    def __init__(self, nbytes: int):
        rt = deps.cudart()
        self.nbytes = int(nbytes)
        self.ptr = int(check(rt.cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))
        self._finalizer = _finalizer(self, lambda p=self.ptr: rt.cudaFree(p), "cudaFree")

    def free(self) -> None:
        self._finalizer()


def copy_to_device(dst: DeviceBuffer, array: np.ndarray, stream: Stream) -> None:
    """Queue a host -> device copy of a C-contiguous array (pageable memory: the call returns when
    the source has been read, so the caller may reuse the array afterwards)."""
    if array.nbytes > dst.nbytes:
        raise ValueError(f"{array.nbytes} bytes do not fit a {dst.nbytes}-byte device buffer")
    rt = deps.cudart()
    src = np.ascontiguousarray(array)
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes, kind, stream.handle), "cudaMemcpyAsync(H2D)")


def copy_to_host(out: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
    """Queue a device -> host copy into ``out`` (C-contiguous); valid after ``stream.synchronize()``."""
    if not out.flags.c_contiguous or out.nbytes > src.nbytes:
        raise ValueError("the host array must be C-contiguous and no larger than the device buffer")
    rt = deps.cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(out.ctypes.data, src.ptr, out.nbytes, kind, stream.handle), "cudaMemcpyAsync(D2H)")


def copy_2d_on_device(
    dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_pitch: int, width: int, height: int,
    stream: Stream, src_offset: int = 0,
) -> None:
    """Queue a strided device -> device copy: ``height`` rows of ``width`` bytes, row r read at
    src + src_offset + r * src_pitch and written at dst + dst_offset + r * dst_pitch (cudaMemcpy2DAsync). The
    rows must lie inside both buffers (the GPU would not say when they do not) and the buffers must
    differ (cudaMemcpy2D's areas may not overlap)."""
    if dst is src:
        raise ValueError("a 2-D copy between parts of one buffer may overlap")
    if width > dst_pitch or width > src_pitch or min(width, height, dst_offset, dst_pitch, src_pitch, src_offset) < 0:
        raise ValueError(f"a {width}-byte row does not fit the pitches {dst_pitch} (dst) / {src_pitch} (src)")
    if height and (dst_offset + (height - 1) * dst_pitch + width > dst.nbytes
                   or src_offset + (height - 1) * src_pitch + width > src.nbytes):
        raise ValueError(f"{height} rows of {width} bytes overrun the {dst.nbytes}-byte destination or the {src.nbytes}-byte source")
    if not width or not height:
        return
    rt = deps.cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    check(rt.cudaMemcpy2DAsync(dst.ptr + dst_offset, dst_pitch, src.ptr + src_offset, src_pitch, width, height, kind, stream.handle),
          "cudaMemcpy2DAsync(D2D)")


def fill_zero(buffer: DeviceBuffer, stream: Stream) -> None:
    rt = deps.cudart()
    check(rt.cudaMemsetAsync(buffer.ptr, 0, buffer.nbytes, stream.handle), "cudaMemsetAsync")


class CudaGraph:
    """The work that ``enqueue`` puts on ``stream``, captured once and replayed with ``launch``.

    The replay reuses the captured device addresses and shapes; the caller keeps them valid.
    """

    def __init__(self, stream: Stream, enqueue: Callable[[], None]):
        rt = deps.cudart()
        self._rt, self._stream = rt, stream
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:  # end the capture (or the stream stays unusable), then report the cause
            status, graph = rt.cudaStreamEndCapture(stream.handle)
            if status == rt.cudaError_t.cudaSuccess and graph is not None:
                _release(lambda: rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        try:
            self._exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:  # the executable graph does not need the template once instantiated
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        _finalizer(self, lambda e=self._exec: rt.cudaGraphExecDestroy(e), "cudaGraphExecDestroy")

    def launch(self) -> None:
        check(self._rt.cudaGraphLaunch(self._exec, self._stream.handle), "cudaGraphLaunch")
