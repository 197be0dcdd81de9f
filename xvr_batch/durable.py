"""Durable files: atomic writes, fsync, temporary names, hashes, pid checks, full disks.

Every file that xvr_batch publishes (manifest, parts, the stitched output, synthetic archives,
lock records) is written under a temporary name *beside* its final name and renamed into place,
so that a reader sees the old file or the complete new one, never a mixture:

* :func:`temp_path` gives the one temporary-name scheme, ``.NAME.tmp-PID-HOST-RANDOM`` (``HOST``
  is 8 hex digits of the host name's sha256, ``RANDOM`` 8 random hex digits), and
  :func:`remove_stale_temps` removes the temporaries of processes on this host that are gone.
* :func:`atomic_write_bytes` writes bytes; :func:`atomic_path` is for writers that produce a file
  by path (``with atomic_path(final) as tmp: write(tmp)``); :class:`AtomicH5File` is for HDF5
  files and survives a full disk (see below). All three fsync the file, rename it (replacing an
  existing file only if ``overwrite``) and fsync the directory; on error they remove the
  temporary file.
* :func:`canonical_json` / :func:`canonical_hash` are the one canonical JSON form (sorted keys,
  compact separators, ASCII escapes, no NaN/inf). Journal checksums and part attributes are
  stored in that form, so it must not change.

**Full disks.** When HDF5 hits ENOSPC it raises (an ``OSError`` with errno 28, or a
``RuntimeError`` whose text says ``errno = 28``), and its file is left half-flushed: a later
close, or the garbage collection of the ``h5py.File``, retries the writes and can crash the
interpreter. :class:`AtomicH5File` therefore flushes before it closes, and after any failure it
points HDF5's file descriptor at an anonymous in-memory file before closing, so that close
succeeds; then it removes the temporary file and raises :class:`DiskFullError` (an ``OSError``
with errno ENOSPC and the file name). The one write HDF5 still does after a successful flush is
a rewrite of the 96-byte superblock in place, which does not need free space on ordinary
filesystems.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import re
import secrets
import socket
import stat
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import psutil

__all__ = [
    "DiskFullError",
    "AtomicH5File",
    "atomic_path",
    "atomic_write_bytes",
    "canonical_hash",
    "canonical_json",
    "disk_full_from",
    "fsync_dir",
    "fsync_file",
    "is_disk_full",
    "pid_alive",
    "remove_stale_temps",
    "remove_stale_temps_in",
    "parse_temp_name",
    "OutputExistsError",
    "sha256_file",
    "temp_path",
]

PathLike = Union[str, "os.PathLike[str]"]

#: errnos that mean "no space left" (a full filesystem, or a full quota).
_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
#: How HDF5 spells a full disk inside the text of the errors that h5py raises.
_FULL_TEXT = re.compile(r"No space left|errno = 28\b|Disk quota exceeded|errno = 122\b")
#: fsync errors meaning "this filesystem cannot fsync that", which are tolerated for directories.
_NO_FSYNC_ERRNOS = frozenset({errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP})


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class DiskFullError(OSError):
    """No space left while writing ``filename``: ``errno`` is ENOSPC whatever HDF5 said."""

    def __init__(self, filename: PathLike, detail: str = ""):
        why = "No space left on device" + (f" ({detail})" if detail else "")
        super().__init__(errno.ENOSPC, why, os.fspath(filename))


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` (an OSError, or any error raised by h5py) says the disk or quota is full."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return bool(_FULL_TEXT.search(str(exc)))


def disk_full_from(exc: BaseException, path: PathLike) -> BaseException:
    """``exc`` turned into a :class:`DiskFullError` for ``path`` if it is a full disk, else ``exc``."""
    if isinstance(exc, DiskFullError) or not is_disk_full(exc):
        return exc
    err = DiskFullError(path)
    err.__cause__ = exc
    return err


# ----------------------------------------------------------------------------------------------
# fsync, hashing, canonical JSON, pids
# ----------------------------------------------------------------------------------------------


def fsync_file(path: PathLike) -> None:
    """fsync the file at ``path`` (opened read-only; enough on Linux to flush its data)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames and creations inside it survive a power loss.

    Filesystems that cannot fsync a directory (EINVAL and friends) are tolerated.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - depends on the filesystem
        if exc.errno not in _NO_FSYNC_ERRNOS:
            raise
    finally:
        os.close(fd)


def sha256_file(path: PathLike, bufsize: int = 1 << 20) -> str:
    """The hex sha256 of the bytes of the regular file ``path`` as they are on disk.

    Never blocks on a FIFO or reads a device: anything but a regular file raises ``OSError``
    (``IsADirectoryError`` for a directory, errno EINVAL otherwise).
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "Not a regular file", os.fspath(path))
        digest = hashlib.sha256()
        while True:
            block = os.read(fd, bufsize)
            if not block:
                break
            digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: sorted keys, ``,``/``:`` separators, ASCII, no NaN.

    Raises ``ValueError`` for NaN/inf and ``TypeError`` for values JSON cannot hold.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_hash(obj: Any) -> str:
    """sha256 hex of the UTF-8 bytes of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def pid_alive(pid: Any) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie.

    A process of another user counts as alive; anything that is not a positive int is dead.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


# ----------------------------------------------------------------------------------------------
# Temporary names
# ----------------------------------------------------------------------------------------------


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


#: ``.NAME.tmp-PID-HOST-RANDOM``; also matches the older ``.NAME.tmp-PID``.
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d{1,10})(?:-(?P<host>[0-9a-f]{8})-[0-9a-f]{8})?")


def temp_path(final: PathLike) -> pathlib.Path:
    """A fresh temporary name beside ``final``: ``.NAME.tmp-PID-HOST-RANDOM``."""
    final = pathlib.Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}")


def parse_temp_name(name: str) -> Optional[Tuple[str, int, Optional[str]]]:
    """``(final name, pid, host tag or None)`` if ``name`` is one of our temporary names."""
    m = _TEMP.fullmatch(name)
    if m is None:
        return None
    return m.group("name"), int(m.group("pid")), m.group("host")


def remove_stale_temps(final: PathLike) -> List[pathlib.Path]:
    """Remove the temporaries of ``final`` left by dead processes of this host; return them.

    Temporaries of live processes, of this process, and of other hosts (whose pids cannot be
    checked from here) are kept. Links are removed as links, never followed.
    """
    final = pathlib.Path(final)
    return remove_stale_temps_in(final.parent, lambda name: name == final.name)


def remove_stale_temps_in(directory: PathLike, match: Callable[[str], bool]) -> List[pathlib.Path]:
    """:func:`remove_stale_temps` for every final name in ``directory`` for which ``match`` is true.

    ``directory`` itself is opened without following a symlink (a linked directory is skipped).
    """
    directory = pathlib.Path(directory)
    me, here = os.getpid(), _host_tag()
    removed: List[pathlib.Path] = []
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0)
                      | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return removed
    try:
        for name in os.listdir(dfd):
            parsed = parse_temp_name(name)
            if parsed is None or not match(parsed[0]):
                continue
            _, pid, host = parsed
            if (host is not None and host != here) or pid == me or pid_alive(pid):
                continue
            try:
                if stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                    continue
                os.unlink(name, dir_fd=dfd)
                removed.append(directory / name)
            except OSError:
                pass
    finally:
        os.close(dfd)
    return removed


# ----------------------------------------------------------------------------------------------
# Atomic publication
# ----------------------------------------------------------------------------------------------


class OutputExistsError(FileExistsError):
    """``publish`` found a file under the final name and was told not to replace it."""


def _publish(tmp: pathlib.Path, final: pathlib.Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``; without ``overwrite`` never replace an existing ``final``."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExistsError(errno.EEXIST, "File exists", os.fspath(final)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK,
                             errno.EXDEV, errno.ENOSYS):
            raise
        # No hard links on this filesystem: check, then rename (a small window remains).
        if os.path.lexists(final):
            raise OutputExistsError(errno.EEXIST, "File exists", os.fspath(final)) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def _unlink_quietly(path: pathlib.Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(final: PathLike, *, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``final``; the caller writes the file there.

    When the block ends normally the file is fsynced and renamed to ``final`` and the directory
    is fsynced. Without ``overwrite`` an existing ``final`` is never replaced:
    :class:`OutputExistsError` (a ``FileExistsError``) is raised instead. If the block or the
    publication fails, the temporary file is removed; errors that mean a full disk are raised as
    :class:`DiskFullError`.
    """
    final = pathlib.Path(final)
    tmp = temp_path(final)
    try:
        yield tmp
        fsync_file(tmp)
        _publish(tmp, final, overwrite)
        fsync_dir(final.parent)
    except BaseException as exc:
        _unlink_quietly(tmp)
        err = disk_full_from(exc, final)
        if err is exc:
            raise
        raise err from exc


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically and durably (see :func:`atomic_path`).

    The temporary file is created exclusively and never through a symlink; a symlink under the
    final name is replaced by the file, not written through.
    """
    with atomic_path(path, overwrite=overwrite) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)


class AtomicH5File:
    """An HDF5 file written under a temporary name beside ``final`` and published by rename.

    ``AtomicH5File(final, overwrite=False, **h5py_kwargs)`` creates the temporary file; write
    through :attr:`file`; then :meth:`commit` (or :meth:`close` and :meth:`publish`). Used as a
    context manager it commits on success and aborts on error. Every failure closes the HDF5
    file safely (see the module docstring), removes the temporary file and raises; a full disk
    raises :class:`DiskFullError` naming ``final``. Use :meth:`fail` in ``except`` clauses
    around writes: it aborts and returns the exception to raise.

    Keep every dataset object you create referenced until :meth:`close` (or call
    ``file.flush()`` before dropping one): HDF5 writes a dataset's cached chunks when the dataset
    is closed, and a write that fails inside h5py's object deallocation is only printed, after
    which HDF5 may crash the interpreter later.
    """

    def __init__(self, final: PathLike, *, overwrite: bool = True, **h5kwargs: Any):
        import h5py

        self.final = pathlib.Path(final)
        self.tmp = temp_path(self.final)
        self.overwrite = overwrite
        self._closed_ok = False
        self._vfd: Optional[int] = None
        self._ident: Optional[Tuple[int, int]] = None
        try:
            self.file: Optional[h5py.File] = h5py.File(self.tmp, "w-", **h5kwargs)
        except BaseException as exc:
            self.file = None
            _unlink_quietly(self.tmp)
            raise self._translate(exc) from exc
        try:
            self._vfd = int(self.file.id.get_vfd_handle())
            st = os.fstat(self._vfd)
            self._ident = (st.st_dev, st.st_ino)
        except Exception:  # pragma: no cover - a driver without a file descriptor
            self._vfd = self._ident = None

    def __enter__(self) -> Any:
        return self.file

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        if exc is None:
            self.commit()
            return
        err = self.fail(exc)
        if err is not exc:
            raise err from exc

    def _translate(self, exc: BaseException) -> BaseException:
        return disk_full_from(exc, self.final)

    def _neutralise(self) -> None:
        """Point HDF5's descriptor at an in-memory file, so that HDF5's next writes succeed."""
        if self._vfd is None or self._ident is None:
            return
        try:
            st = os.fstat(self._vfd)
            if (st.st_dev, st.st_ino) != self._ident:
                return  # not our file any more: leave that descriptor alone
            memfd = getattr(os, "memfd_create", None)
            spare = memfd("xvr-h5-discard") if memfd else os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(spare, self._vfd)
            finally:
                os.close(spare)
        except OSError:
            pass

    def _drop(self) -> None:
        """Close the HDF5 file after a failure, without letting HDF5 touch the disk again."""
        fh, self.file = self.file, None
        if fh is None:
            return
        self._neutralise()
        try:
            fh.close()
        except Exception:  # pragma: no cover - closing into memory does not fail
            pass

    def close(self) -> None:
        """Flush and close the HDF5 file and fsync the temporary file (still unpublished)."""
        fh = self.file
        if fh is None:
            raise RuntimeError(f"{self.final}: HDF5 file already closed")
        try:
            fh.flush()
        except BaseException as exc:
            raise self.fail(exc) from exc
        self.file = None
        try:
            fh.close()
            fsync_file(self.tmp)
        except BaseException as exc:
            _unlink_quietly(self.tmp)
            raise self._translate(exc) from exc
        self._closed_ok = True

    def publish(self) -> pathlib.Path:
        """Rename the closed temporary file to ``final`` and fsync the directory."""
        if not self._closed_ok:
            raise RuntimeError(f"{self.final}: close() the HDF5 file before publishing it")
        try:
            _publish(self.tmp, self.final, self.overwrite)
            fsync_dir(self.final.parent)
        except BaseException as exc:
            _unlink_quietly(self.tmp)
            raise self._translate(exc) from exc
        return self.final

    def commit(self) -> pathlib.Path:
        """:meth:`close` then :meth:`publish`; returns ``final``."""
        self.close()
        return self.publish()

    def abort(self) -> None:
        """Drop the HDF5 file and remove the temporary file (idempotent, never raises)."""
        self._drop()
        _unlink_quietly(self.tmp)

    def fail(self, exc: BaseException) -> BaseException:
        """Abort, then return ``exc`` as it should be raised (a full disk as DiskFullError)."""
        self.abort()
        return self._translate(exc)
