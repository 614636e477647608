"""An fsync that runs beside the calling thread without a Python thread: `start_fsync(fd)`.

The receive path starts a received file's fsync at its last fragment and the spool folder's fsync after
the rename, and checks the data set and commits the instance row while both run (`Spool.start_flush`,
`Spool.adopt`). In a Python thread pool each of those flushes must take the GIL to start and again to
finish, while the receive thread holds it for its checks: the file's fsync began about 0.27 ms after it
was submitted, and every hand-over costs both threads a wake-up (docs/benchmarks.md, "Sixth session").

On Linux, `start_fsync` hands the flush to the C library's POSIX AIO (`aio_fsync`, glibc or musl): the
library runs `fsync` in its own native helper thread, which never takes the GIL, and `result()` waits in
`aio_suspend` with the GIL released. Elsewhere, or when the C library lacks `aio_fsync` or refuses a
request, the flush runs in a small Python thread pool as before (`PoolFlush`); both are `Flushing`:
`result()` returns when the data and metadata of the file are on stable storage, or raises the OSError
that fsync raised.

Each flush works on its own duplicate of the descriptor (the caller may close its own at once) and
closes it when the flush is over. A flush whose result nobody asks for (an instance refused after its
flush began) is finished by the next `start_fsync`, which reaps the ones done: its control block stays
referenced from here until the C library is done with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

__all__ = ["Flushing", "NativeFlush", "PoolFlush", "native_available", "start_fsync"]


class Flushing(Protocol):
    """An fsync under way: `result()` waits for it and raises its OSError, if any."""

    def result(self) -> None: ...


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-fsync")


class PoolFlush:
    """An fsync of a duplicate of `fd` in a Python pool thread (where POSIX AIO is not available)."""

    def __init__(self, fd: int) -> None:
        self._future: Future[None] = _pool.submit(_fsync_and_close, os.dup(fd))

    def result(self) -> None:
        self._future.result()


# --- POSIX AIO through ctypes ----------------------------------------------------------------------
# struct aiocb begins with the fields POSIX names, in this order, in glibc and musl alike; the library's
# own fields follow (glibc: 168 bytes in all on 64-bit Linux, musl: less). _private leaves room for them.
class _SigEvent(ctypes.Structure):
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("_rest", ctypes.c_byte * 48)]  # struct sigevent is 64 bytes on Linux


class _AioCb(ctypes.Structure):
    _fields_ = [("aio_fildes", ctypes.c_int), ("aio_lio_opcode", ctypes.c_int), ("aio_reqprio", ctypes.c_int),
                ("aio_buf", ctypes.c_void_p), ("aio_nbytes", ctypes.c_size_t), ("aio_sigevent", _SigEvent),
                ("_private", ctypes.c_byte * 512)]


_SIGEV_NONE = 1  # Linux: no notification, the caller asks


def _load_aio() -> Any:
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    for name in (None, ctypes.util.find_library("rt")):  # glibc >= 2.34 and musl: libc itself; older glibc: librt
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.aio_fsync, lib.aio_error, lib.aio_return, lib.aio_suspend  # noqa: B018  # all four, or none
        except (OSError, AttributeError):
            continue
        lib.aio_fsync.argtypes = [ctypes.c_int, ctypes.POINTER(_AioCb)]
        lib.aio_error.argtypes = [ctypes.POINTER(_AioCb)]
        lib.aio_return.argtypes = [ctypes.POINTER(_AioCb)]
        lib.aio_return.restype = ctypes.c_ssize_t
        lib.aio_suspend.argtypes = [ctypes.POINTER(ctypes.POINTER(_AioCb)), ctypes.c_int, ctypes.c_void_p]
        return lib
    return None


_aio = _load_aio()
_in_flight: set[NativeFlush] = set()  # started and not yet finished: their control blocks must stay alive
_in_flight_lock = threading.Lock()


class NativeFlush:
    """An fsync of a duplicate of `fd` run by the C library's POSIX AIO (`aio_fsync(O_SYNC)`).

    Raises OSError when the library refuses the request (then nothing is under way)."""

    __slots__ = ("_cb", "_fd", "_error", "__weakref__")

    def __init__(self, fd: int) -> None:
        if _aio is None:
            raise OSError(errno.ENOSYS, "POSIX AIO is not available here")
        self._fd = os.dup(fd)
        self._error: int | None = None  # errno of the finished fsync (0: it succeeded); None: not finished
        self._cb = _AioCb()
        self._cb.aio_fildes = self._fd
        self._cb.aio_sigevent.sigev_notify = _SIGEV_NONE
        with _in_flight_lock:
            if _aio.aio_fsync(os.O_SYNC, ctypes.byref(self._cb)) != 0:
                err = ctypes.get_errno()
                os.close(self._fd)
                raise OSError(err, f"aio_fsync: {os.strerror(err)}")
            _in_flight.add(self)

    def _finish_if_done(self) -> bool:
        """Collect the result when the library is done (call under `_in_flight_lock`)."""
        if self._error is not None:
            return True
        err = _aio.aio_error(ctypes.byref(self._cb))
        if err == errno.EINPROGRESS:
            return False
        _aio.aio_return(ctypes.byref(self._cb))  # releases the library's record of the request
        self._error = err
        os.close(self._fd)
        _in_flight.discard(self)
        return True

    def result(self) -> None:
        blocks = (ctypes.POINTER(_AioCb) * 1)(ctypes.pointer(self._cb))
        while True:
            with _in_flight_lock:
                if self._finish_if_done():
                    break
            _aio.aio_suspend(blocks, 1, None)  # ctypes releases the GIL while it waits
        if self._error:
            raise OSError(self._error, f"fsync: {os.strerror(self._error)}")


def native_available() -> bool:
    """Whether `start_fsync` runs flushes in the C library's POSIX AIO (Linux, 64-bit) rather than a pool."""
    return _aio is not None


def start_fsync(fd: int) -> Flushing:
    """Start an fsync of the file open as `fd` (a duplicate of it: the caller may close `fd` at once)."""
    if _aio is not None:
        with _in_flight_lock:
            for pending in list(_in_flight):  # flushes nobody waited for (their instance was refused)
                pending._finish_if_done()
        try:
            return NativeFlush(fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                raise
            # EAGAIN (the library's queue is full) or ENOSYS: the pool does it
    return PoolFlush(fd)
