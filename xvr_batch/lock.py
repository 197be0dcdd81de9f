"""Locks: one live run per work directory (:class:`WorkDirLock`) and per output file (:class:`OutputLock`).

**Work directory.** :class:`WorkDirLock` holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the work
directory *itself* (a descriptor opened ``O_RDONLY | O_DIRECTORY``), kept open while held. The
directory cannot be deleted from under a live run the way a lock file can, so deleting ``lock``
does not let a second run in. The file ``lock`` only holds the holder's record
(``{"pid", "host", "started"}``, replaced atomically) for messages. The kernel drops a flock
when its holder dies, even on SIGKILL, so a lock left by a dead run is taken over silently. The
descriptor is close-on-exec but is shared with children created by a bare ``fork()``: while such a
child lives, the lock stays held, and a new run is refused with a message naming the dead parent.

On filesystems without ``flock`` (ENOSYS, ENOLCK, ...) the lock falls back to an exclusive-create
pid file ``lock``: a holder on this host that is no longer alive is taken over, a holder on
another host must be removed by hand.

**Output.** :class:`OutputLock` guards one output file against two runs that name it through
different work directories: a flock on the hidden file ``.NAME.lock`` beside the output, which
holds the holder's record. It is removed at release; a run that locked a lock file which was
removed meanwhile notices (the path no longer names its inode) and tries again.

Every refusal is a one-line :class:`~xvr_batch.errors.UserError` naming the holder.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import stat
import time
from typing import Any, Callable, Dict, Optional, Union

from xvr_batch.durable import atomic_write_bytes, fsync_dir, pid_alive
from xvr_batch.errors import UserError

__all__ = ["WorkDirLock", "OutputLock", "not_writable", "read_holder_file"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: flock errors meaning "this filesystem does not do flock", which trigger the pid-file fallback.
_NO_FLOCK_ERRNOS = frozenset(
    {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)
_BUSY_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})
#: errors that mean "this place cannot be written" (as opposed to a full disk or a bug).
_NOT_WRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
#: The longest holder record read back (a record is ~100 bytes).
_MAX_RECORD = 4096


def not_writable(exc: OSError, where: PathLike, option: str = "--workdir") -> Optional[UserError]:
    """A one-line UserError if ``exc`` means ``where`` cannot be written, else None."""
    if exc.errno not in _NOT_WRITABLE_ERRNOS:
        return None
    return UserError(
        f"work directory {where} is not writable ({os.strerror(exc.errno)}); choose another {option}"
        if option == "--workdir"
        else f"{where} is not writable ({os.strerror(exc.errno)}); choose another {option}"
    )


def _make_record(**extra: Any) -> bytes:
    info: Dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra)
    return (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")


def _parse_holder(raw: bytes) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None
    out = {k: " ".join(str(info.get(k, "?")).split())[:200] for k in ("host", "started")}
    out["pid"] = pid
    if "workdir" in info:
        out["workdir"] = " ".join(str(info["workdir"]).split())[:500]
    return out


def read_holder_file(path: PathLike) -> Optional[Dict[str, Any]]:
    """The holder record in ``path``, or None if absent, not a regular file, or unparseable.

    Never blocks (a FIFO is not opened for real) and never reads more than a few KiB.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
                     | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _parse_holder(os.pread(fd, _MAX_RECORD, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def _holder_dead_here(holder: Dict[str, Any]) -> bool:
    return holder["host"] == socket.gethostname() and not pid_alive(holder["pid"])


def _in_use_message(what: str, holder: Dict[str, Any], hint: str = "") -> str:
    return (
        f"{what} is in use by pid {holder['pid']} on host {holder['host']} since "
        f"{holder['started']}; wait for it or stop it{hint}"
    )


class _FlockUnsupported(Exception):
    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


def _try_flock(fd: int) -> bool:
    """True if the exclusive flock was taken, False if someone else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in _BUSY_ERRNOS:
            return False
        if exc.errno in _NO_FLOCK_ERRNOS:
            raise _FlockUnsupported(exc.errno) from None
        raise


class _PidFile:
    """An exclusive-create pid file, for filesystems without flock."""

    def __init__(self, path: pathlib.Path, grace_s: float, busy: Callable[[Dict[str, Any], str], UserError]):
        self.path = path
        self.grace_s = grace_s
        self.busy = busy
        self.fd: Optional[int] = None
        self.record: Optional[bytes] = None

    def acquire(self, record: bytes) -> None:
        deadline = time.monotonic() + self.grace_s
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        while True:
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, record)
                    os.fsync(fd)
                    fsync_dir(self.path.parent)
                except BaseException:
                    os.close(fd)
                    try:
                        os.unlink(self.path)
                    except OSError:
                        pass
                    raise
                self.fd, self.record = fd, record
                return
            try:
                raw = _read_small(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = _parse_holder(raw)
            if holder is not None and not _holder_dead_here(holder):
                hint = ""
                if holder["host"] != socket.gethostname():
                    hint = f" (if that process is gone, delete {self.path})"
                raise self.busy(holder, hint)
            if holder is None and time.monotonic() < deadline:
                time.sleep(0.05)  # its creator may still be writing it
                continue
            log.debug("taking over stale lock %s (%s)", self.path, raw[:200].decode("utf-8", "replace"))
            self._remove_stale(raw)

    def _remove_stale(self, judged: bytes) -> None:
        """Remove the lock file if it still holds ``judged``; put back anything else."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if _read_small(aside) != judged:
                # Someone took the stale lock over before us: restore theirs, unless yet another
                # process has created a lock meanwhile.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
        finally:
            try:
                os.unlink(aside)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        fd, record = self.fd, self.record
        self.fd = self.record = None
        if fd is None:
            return
        try:
            if _read_small(self.path) == record:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_small(path: pathlib.Path) -> bytes:
    """The first few KiB of a regular file; ``b""`` for anything that is not one."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, _MAX_RECORD, 0)
    finally:
        os.close(fd)


class _HeldLock:
    """What both locks share: held while acquired, a context manager, and the holder record at ``path``."""

    path: pathlib.Path
    _fd: Optional[int]
    _pidfile: Optional["_PidFile"]

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming who holds it (or why it cannot)."""
        if self.held:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        try:
            self._acquire()
        except OSError as exc:
            err = self._os_error(exc)
            if err is None:
                raise
            raise err from None

    def _acquire(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _os_error(self, exc: OSError) -> Optional[UserError]:  # pragma: no cover - overridden
        """The user's problem behind an OSError while acquiring (None: a bug, re-raised)."""
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._fd is not None or self._pidfile is not None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def read_holder(self) -> Optional[Dict[str, Any]]:
        """The holder record in the lock file, or None if absent, empty or unparseable."""
        return read_holder_file(self.path)


class WorkDirLock(_HeldLock):
    """Exclusive lock on a work directory, held from :meth:`acquire` to :meth:`release`.

    ``path`` is the holder-record file (``WORKDIR/lock``); the flock is on its directory. See
    the module docstring. ``use_flock=None`` detects filesystems without flock and falls back to a
    pid file; ``True`` insists on flock, ``False`` forces the pid file. ``grace_s`` is how long a
    contended lock whose record is empty or names a dead process is retried (its new holder may
    still be writing its record) before giving up.
    """

    def __init__(self, path: PathLike, *, use_flock: Optional[bool] = None, grace_s: float = 2.0):
        self.path: pathlib.Path = pathlib.Path(os.path.abspath(os.fspath(path)))
        self.workdir: pathlib.Path = self.path.parent
        self.use_flock = use_flock
        self.grace_s = float(grace_s)
        self._fd: Optional[int] = None
        self._record: Optional[bytes] = None
        self._pidfile: Optional[_PidFile] = None

    def _os_error(self, exc: OSError) -> Optional[UserError]:
        err = not_writable(exc, self.workdir)
        if err is None and exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP):
            err = UserError(f"work directory {self.workdir} is damaged: {exc.filename or self.path} is in "
                            f"the way ({exc.strerror}); remove it, or choose another --workdir")
        return err

    def _acquire(self) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(
                f"work directory {self.workdir} exists but is not a directory; choose another --workdir"
            ) from None
        if self.use_flock is not False:
            try:
                self._acquire_flock()
                return
            except _FlockUnsupported as exc:
                if self.use_flock:
                    raise OSError(exc.errno, f"flock is not supported on {self.workdir}") from None
                log.warning(
                    "flock is not supported on %s (%s); falling back to a pid file lock",
                    self.workdir, os.strerror(exc.errno),
                )
        pidfile = _PidFile(self.path, self.grace_s,
                           lambda holder, hint: UserError(_in_use_message(str(self.workdir), holder, hint)))
        pidfile.acquire(_make_record())
        self._pidfile = pidfile

    def release(self) -> None:
        """Release the lock (idempotent); the holder record is removed if it is still ours."""
        if self._pidfile is not None:
            pidfile, self._pidfile = self._pidfile, None
            pidfile.release()
            return
        fd, record = self._fd, self._record
        if fd is None:
            return
        self._fd = self._record = None
        try:
            try:
                if _read_small(self.path) == record:
                    os.unlink(self.path)  # no stale holder info for the next reader
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire_flock(self) -> None:
        try:
            fd = os.open(self.workdir, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
        except NotADirectoryError:
            raise UserError(
                f"work directory {self.workdir} is not a directory; choose another --workdir"
            ) from None
        deadline = time.monotonic() + self.grace_s
        try:
            while not _try_flock(fd):
                holder = self.read_holder()
                if holder is not None and not _holder_dead_here(holder):
                    raise UserError(_in_use_message(str(self.workdir), holder))
                if time.monotonic() >= deadline:
                    if holder is None:
                        raise UserError(
                            f"{self.workdir} is in use by another process (it is locked but "
                            f"{self.path} names no holder); wait for it or stop it "
                            f"(fuser -v {self.workdir} lists it)"
                        )
                    raise UserError(
                        f"{self.workdir} is locked by a leftover child of pid {holder['pid']} on "
                        f"host {holder['host']} (started {holder['started']}), which is no longer "
                        f"running; stop the leftover processes (fuser -v {self.workdir} lists them) "
                        "and rerun"
                    )
                time.sleep(0.05)
            self._refuse_old_release_holder()
            previous = self.read_holder()
            if previous is not None:
                log.debug(
                    "taking over lock %s left by pid %s on host %s (started %s)",
                    self.workdir, previous["pid"], previous["host"], previous["started"],
                )
            record = _make_record()
            atomic_write_bytes(self.path, record)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._record = fd, record


    def _refuse_old_release_holder(self) -> None:
        """Refuse if a run of an older release holds its flock on the file ``lock`` itself."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            try:
                held = not _try_flock(fd)
            except (_FlockUnsupported, OSError):
                return
            if held:
                holder = _parse_holder(os.pread(fd, _MAX_RECORD, 0))
                if holder is None:
                    raise UserError(
                        f"{self.workdir} is in use by another process ({self.path} is locked); wait "
                        f"for it or stop it (fuser -v {self.path} lists it)"
                    )
                raise UserError(_in_use_message(str(self.workdir), holder))
        finally:
            os.close(fd)  # also drops the flock we may just have taken


class OutputLock(_HeldLock):
    """Exclusive lock on an output file name, held for a whole run (see the module docstring).

    ``OutputLock(output, workdir=None)``; ``workdir`` is recorded for the message that another
    run gets. ``use_flock`` and ``grace_s`` as for :class:`WorkDirLock`.
    """

    def __init__(self, output: PathLike, *, workdir: Optional[PathLike] = None,
                 use_flock: Optional[bool] = None, grace_s: float = 2.0):
        self.output: pathlib.Path = pathlib.Path(os.path.abspath(os.fspath(output)))
        self.path: pathlib.Path = self.output.with_name(f".{self.output.name}.lock")
        self.workdir = None if workdir is None else os.path.abspath(os.fspath(workdir))
        self.use_flock = use_flock
        self.grace_s = float(grace_s)
        self._fd: Optional[int] = None
        self._record: Optional[bytes] = None
        self._pidfile: Optional[_PidFile] = None


    def _busy(self, holder: Optional[Dict[str, Any]], hint: str = "") -> UserError:
        if holder is None:
            return UserError(
                f"{self.output} is being written by another run ({self.path} is locked); wait for "
                "it or choose another -o"
            )
        where = f", work directory {holder['workdir']}" if holder.get("workdir") else ""
        return UserError(
            f"{self.output} is being written by another run (pid {holder['pid']} on host "
            f"{holder['host']} since {holder['started']}{where}); wait for it or choose another "
            f"-o{hint}"
        )

    def _record_bytes(self) -> bytes:
        return _make_record(**({"workdir": self.workdir} if self.workdir else {}))

    def _os_error(self, exc: OSError) -> Optional[UserError]:
        err = not_writable(exc, self.output.parent, option="-o")
        if err is None and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            err = UserError(f"{self.output}: output folder {self.output.parent} does not exist; create it first")
        return err

    def _acquire(self) -> None:
        if self.use_flock is not False:
            try:
                self._acquire_flock()
                return
            except _FlockUnsupported as exc:
                if self.use_flock:
                    raise OSError(exc.errno, f"flock is not supported on {self.path}") from None
                log.warning("flock is not supported on %s; falling back to a pid file lock", self.path)
        pidfile = _PidFile(self.path, self.grace_s, self._busy)
        pidfile.acquire(self._record_bytes())
        self._pidfile = pidfile

    def _acquire_flock(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        deadline = time.monotonic() + self.grace_s
        while True:
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UserError(f"{self.path} is a symlink; remove it and rerun") from None
                raise
            try:
                if not _try_flock(fd):
                    holder = read_holder_file(self.path)
                    if holder is None and time.monotonic() < deadline:
                        os.close(fd)
                        time.sleep(0.05)  # its holder may still be writing its record
                        continue
                    raise self._busy(holder)
                # The holder before us may have removed the file between our open and our flock:
                # then the lock we hold is on an orphan inode, and we must start over.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                record = self._record_bytes()
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
                os.fsync(fd)
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            self._fd, self._record = fd, record
            return

    def release(self) -> None:
        """Release the lock and remove ``.NAME.lock`` (idempotent)."""
        if self._pidfile is not None:
            pidfile, self._pidfile = self._pidfile, None
            pidfile.release()
            return
        fd = self._fd
        if fd is None:
            return
        self._fd = self._record = None
        try:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False)):
                    os.unlink(self.path)  # while still locked: nobody can hold this inode
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
