"""The work directory of one reconstruction: manifest, journal, parts and lock.

A work directory (default ``OUT.h5.xvr/``) looks like this::

    manifest.json      the plan, input fingerprint, config and weights hashes, normalisation
    journal.jsonl      append-only log: one JSON line per finished (or failed) work unit
    parts/             one small HDF5 file per finished unit (see :mod:`xvr_batch.io.parts`)
    lock               who is working here (pid, host, start time), guarded by flock

Crash-safety guarantees (the process may be SIGKILLed, or the node may lose power, at any point):

* **Manifest.** Written to a temporary file in the same directory, flushed and fsynced, then
  renamed over ``manifest.json`` with :func:`os.replace`, and the directory is fsynced. A reader
  sees either the old manifest or the new one, never a mixture. It is read as JSON only.
* **Parts.** Written under a temporary name and renamed (see :mod:`xvr_batch.io.parts`), so a part
  file under its final name is always complete. Its sha256 is recorded in the journal only *after*
  the rename, so the journal never points at a part that was not fully written.
* **Journal.** Every record is one line, written with a single ``os.write`` on an ``O_APPEND``
  descriptor and fsynced before :meth:`WorkDir.record_done` returns. Each line carries a sha256
  (``crc``) of its own canonical JSON. A crash can at worst leave a truncated last line (or, on
  some filesystems, a run of NUL bytes); :meth:`WorkDir.read_journal` skips such lines, and the
  next append starts on a fresh line. A unit is done only if its latest valid record says so *and*
  (when verified) its part exists inside the work directory with the recorded sha256; anything
  else is simply redone. Losing a record therefore costs recomputation, never correctness.
* **Replanning.** :meth:`WorkDir.create` discards any previous journal *before* it writes the new
  manifest, so a crash in between leaves a manifest with no completions (everything is redone)
  rather than a new manifest with stale completions.
* **Paths from the journal** are untrusted: absolute paths, ``..`` components and symlinks that
  resolve outside the work directory are refused.
* **Lock.** :class:`WorkDirLock` holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``lock`` for as long as
  the work runs. The kernel drops the lock when its holder dies, even on SIGKILL, so a lock left
  behind by a dead run is taken over silently. On filesystems without ``flock`` the lock falls back
  to an exclusive-create pid file; a pid file left by a process on this host that is no longer alive
  is taken over, one left by another host must be removed by the user.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import socket
import time
from typing import Any, Dict, Optional, Tuple, Union

from xvr_batch.errors import UserError

__all__ = [
    "MANIFEST_VERSION",
    "REQUIRED_MANIFEST_KEYS",
    "WorkDir",
    "WorkDirLock",
    "sha256_file",
    "fsync_dir",
    "atomic_write_bytes",
    "journal_crc",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST_VERSION = 1
REQUIRED_MANIFEST_KEYS = ("version", "plan", "fingerprint", "config_hash", "weights_sha256")

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "journal.jsonl"
PARTS_NAME = "parts"
LOCK_NAME = "lock"

#: Fields every journal record carries, which ``extra`` may not override.
_RESERVED_FIELDS = frozenset(
    {"unit", "part", "sha256", "frames", "t", "status", "error", "crc", "bytes"}
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PART_FILE = re.compile(r"unit-\d{6,}\.h5(\.tmp-\d+)?")
#: Longest error message kept in a ``failed`` record.
_MAX_ERROR_CHARS = 2000


# ----------------------------------------------------------------------------------------------
# Small durability helpers (shared with xvr_batch.io.parts)
# ----------------------------------------------------------------------------------------------


def sha256_file(path: PathLike, bufsize: int = 1 << 20) -> str:
    """Return the hex sha256 of the bytes of ``path`` as they are on disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(bufsize)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames and creations inside it survive a power loss.

    Filesystems that cannot fsync a directory (EINVAL and friends) are tolerated.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - depends on the filesystem
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably.

    The bytes go to ``PATH.tmp-PID`` in the same directory, are fsynced, renamed over ``path`` and
    the directory is fsynced. Readers see the old content or the new, never a mixture; the
    temporary file is removed if anything fails.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def journal_crc(record: Dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``crc`` field."""
    body = {k: v for k, v in record.items() if k != "crc"}
    return hashlib.sha256(_canonical_json(body).encode("utf-8")).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# Work directory
# ----------------------------------------------------------------------------------------------


class WorkDir:
    """A work directory. Constructing one touches nothing on disk.

    Attributes set by the readers:

    * ``journal_skipped`` -- number of journal lines the last :meth:`read_journal` skipped
      (truncated, not JSON, wrong types, bad crc).
    * ``problems`` -- ``{unit_id: reason}`` for units whose latest record says done but which
      :meth:`completed_units` did not accept (missing or corrupt part, unsafe path, frames that
      do not match the plan).
    """

    def __init__(self, path: PathLike):
        self.path: pathlib.Path = pathlib.Path(os.path.abspath(os.fspath(path)))
        self.manifest_path: pathlib.Path = self.path / MANIFEST_NAME
        self.journal_path: pathlib.Path = self.path / JOURNAL_NAME
        self.parts_dir: pathlib.Path = self.path / PARTS_NAME
        self.lock_path: pathlib.Path = self.path / LOCK_NAME
        self.journal_skipped: int = 0
        self.problems: Dict[int, str] = {}

    def __repr__(self) -> str:
        return f"WorkDir({str(self.path)!r})"

    # -- manifest ------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True if the work directory has a manifest."""
        return self.manifest_path.is_file()

    def create(self, manifest: Dict[str, Any]) -> None:
        """Create the directory and ``parts/`` if needed and write ``manifest`` as a fresh plan.

        Any previous journal is removed first (and with it every recorded completion), together
        with leftover part files, because they belong to the previous plan.
        """
        _validate_manifest(manifest, where=str(self.manifest_path), on_error=ValueError)
        self.path.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        fsync_dir(self.path.parent)
        removed_journal = False
        try:
            os.unlink(self.journal_path)
            removed_journal = True
        except FileNotFoundError:
            pass
        if removed_journal:
            fsync_dir(self.path)
            log.debug("removed the previous journal %s", self.journal_path)
        for entry in os.listdir(self.parts_dir):
            if _PART_FILE.fullmatch(entry):
                try:
                    os.unlink(self.parts_dir / entry)
                except FileNotFoundError:
                    pass
        self.write_manifest(manifest)
        fsync_dir(self.path)

    def write_manifest(self, manifest: Dict[str, Any]) -> None:
        """Write ``manifest`` atomically (tmp file, fsync, ``os.replace``, fsync dir)."""
        _validate_manifest(manifest, where=str(self.manifest_path), on_error=ValueError)
        data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_bytes(self.manifest_path, data.encode("utf-8"))

    def read_manifest(self) -> Dict[str, Any]:
        """Read and validate ``manifest.json`` (JSON only); :class:`UserError` if missing/bad."""
        where = str(self.manifest_path)
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            raise UserError(
                f"no manifest at {where}: {self.path} is not an xvr_batch work directory; "
                "check the path, or run reconstruct to create it"
            ) from None
        except OSError as exc:
            raise UserError(
                f"cannot read manifest {where}: {exc.strerror}; check its permissions"
            ) from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise UserError(
                f"manifest {where} is corrupt (not valid JSON: {exc}); "
                "rerun with --force-replan or delete the work directory"
            ) from None
        _validate_manifest(manifest, where=where, on_error=UserError)
        return manifest

    def plan_units(self, manifest: Optional[Dict[str, Any]] = None) -> Dict[int, Tuple[int, int]]:
        """``{unit_id: (start, stop)}`` from ``manifest["plan"]["units"]`` (read if not given)."""
        if manifest is None:
            manifest = self.read_manifest()
        units = manifest["plan"].get("units") if isinstance(manifest.get("plan"), dict) else None
        bad = (
            f"manifest {self.manifest_path} has a corrupt plan (plan.units must be a list of "
            "{id, start, stop} with unique ids and 0 <= start <= stop); "
            "rerun with --force-replan or delete the work directory"
        )
        if not isinstance(units, list):
            raise UserError(bad)
        out: Dict[int, Tuple[int, int]] = {}
        for unit in units:
            if not isinstance(unit, dict):
                raise UserError(bad)
            uid, start, stop = unit.get("id"), unit.get("start"), unit.get("stop")
            if not (_is_int(uid) and _is_int(start) and _is_int(stop)) or uid in out:
                raise UserError(bad)
            if not 0 <= start <= stop:
                raise UserError(bad)
            out[uid] = (start, stop)
        return out

    # -- parts ---------------------------------------------------------------------------------

    def part_path(self, unit_id: int) -> pathlib.Path:
        """Where the part of ``unit_id`` lives: ``parts/unit-000042.h5``."""
        if not _is_int(unit_id) or unit_id < 0:
            raise ValueError(f"unit id must be a non-negative int, got {unit_id!r}")
        return self.parts_dir / f"unit-{unit_id:06d}.h5"

    def part_relpath(self, unit_id: int) -> str:
        """The part path of ``unit_id`` relative to the work directory, as the journal stores it."""
        return self.part_path(unit_id).relative_to(self.path).as_posix()

    def resolve_part(self, rel: str) -> pathlib.Path:
        """Turn a journal-recorded relative path into a path inside the work directory.

        Refuses (:class:`UserError`) empty or absolute paths, any ``..`` component, and paths
        that do not resolve (following symlinks) to something strictly inside the work directory.
        Returns ``self.path / rel``.
        """
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise UserError(
                f"invalid part path {rel!r} in {self.journal_path}; "
                "delete that journal line or the work directory"
            )
        pure = pathlib.PurePosixPath(rel)
        if pure.is_absolute() or rel.startswith("\\") or ".." in pure.parts:
            raise UserError(
                f"part path {rel!r} in {self.journal_path} escapes the work directory {self.path}; "
                "part paths must be relative and stay inside it: delete that journal line"
            )
        candidate = self.path.joinpath(*pure.parts)
        try:
            root = self.path.resolve()
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # symlink loop
            raise UserError(
                f"part path {rel!r} under {self.path} cannot be resolved ({exc}); "
                "remove the link and rerun"
            ) from None
        if root not in resolved.parents:
            raise UserError(
                f"part path {rel!r} under {self.path} resolves to {resolved}, outside the work "
                "directory (symlink?); remove the link and rerun"
            )
        return candidate

    # -- journal -------------------------------------------------------------------------------

    def record_done(
        self,
        unit_id: int,
        rel_part: str,
        sha256: str,
        frames: Tuple[int, int],
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Append (and fsync) a record saying ``unit_id`` is done, its part and the part's sha256.

        Call it only after the part has been renamed into place. ``frames`` is ``(start, stop)``.
        ``extra`` adds JSON fields (not the reserved ones).
        """
        if not _is_int(unit_id) or unit_id < 0:
            raise ValueError(f"unit id must be a non-negative int, got {unit_id!r}")
        sha = str(sha256).lower()
        if not _HEX64.fullmatch(sha):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        start, stop = (int(frames[0]), int(frames[1]))
        if not 0 <= start <= stop:
            raise ValueError(f"frames must be (start, stop), 0 <= start <= stop; got {frames!r}")
        path = self.resolve_part(rel_part)
        record: Dict[str, Any] = {
            "unit": unit_id,
            "status": "done",
            "part": pathlib.PurePosixPath(rel_part).as_posix(),
            "sha256": sha,
            "frames": [start, stop],
            "t": time.time(),
        }
        try:
            record["bytes"] = os.stat(path).st_size
        except OSError:
            pass
        if extra:
            clash = _RESERVED_FIELDS.intersection(extra)
            if clash:
                raise ValueError(f"extra may not set the reserved journal fields {sorted(clash)}")
            record.update(extra)
        self._append(record)

    def record_failed(self, unit_id: int, error: str) -> None:
        """Append (and fsync) a record saying ``unit_id`` failed with ``error`` (one line)."""
        if not _is_int(unit_id) or unit_id < 0:
            raise ValueError(f"unit id must be a non-negative int, got {unit_id!r}")
        message = " ".join(str(error).split())[:_MAX_ERROR_CHARS]
        self._append({"unit": unit_id, "status": "failed", "error": message, "t": time.time()})

    def _append(self, record: Dict[str, Any]) -> None:
        record = dict(record)
        record["crc"] = journal_crc(record)
        line = (_canonical_json(record) + "\n").encode("utf-8")
        self.path.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.journal_path, flags, 0o644)
        try:
            size = os.fstat(fd).st_size
            empty = size == 0
            if not empty and os.pread(fd, 1, size - 1) != b"\n":
                # The previous writer died mid-line: start ours on a fresh line so that only the
                # torn record is lost.
                line = b"\n" + line
            if os.write(fd, line) != len(line):  # pragma: no cover - disk full etc.
                raise OSError(errno.EIO, f"short write to {self.journal_path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        if empty:  # possibly a new file: make its directory entry durable
            fsync_dir(self.path)

    def read_journal(self) -> Dict[int, Dict[str, Any]]:
        """The latest valid record per unit. Never raises on garbage.

        Lines that are truncated, not JSON, have wrong field types or a bad crc are skipped and
        counted in ``self.journal_skipped``. Blank lines are ignored.
        """
        self.journal_skipped = 0
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return {}
        latest: Dict[int, Dict[str, Any]] = {}
        for chunk in raw.split(b"\n"):
            if not chunk.strip():
                continue
            record = _parse_record(chunk)
            if record is None:
                self.journal_skipped += 1
                continue
            latest[record["unit"]] = record
        if self.journal_skipped:
            log.warning(
                "%s: skipped %d damaged journal line(s)", self.journal_path, self.journal_skipped
            )
        return latest

    def completed_units(self, verify: bool = True) -> Dict[int, Dict[str, Any]]:
        """Units whose latest record is ``done`` and whose part can be trusted.

        The part path must stay inside the work directory. If the manifest exists, the unit must
        be in the plan with the same frames. With ``verify`` the part must exist and have the
        recorded sha256. Rejected units are listed in ``self.problems`` (unit -> reason); they
        are not returned and should be redone.
        """
        plan = self.plan_units() if self.exists() else None
        return self._accept(self.read_journal(), plan, verify)

    def _accept(
        self,
        journal: Dict[int, Dict[str, Any]],
        plan: Optional[Dict[int, Tuple[int, int]]],
        verify: bool,
    ) -> Dict[int, Dict[str, Any]]:
        """The ``done`` records of ``journal`` that pass the checks of :meth:`completed_units`."""
        self.problems = {}
        done: Dict[int, Dict[str, Any]] = {}
        for uid, record in sorted(journal.items()):
            if record.get("status", "done") != "done":
                continue
            try:
                path = self.resolve_part(record["part"])
            except UserError as exc:
                self.problems[uid] = str(exc)
                continue
            if plan is not None:
                if uid not in plan:
                    self.problems[uid] = f"unit {uid} is not in the plan of {self.manifest_path}"
                    continue
                if tuple(record["frames"]) != plan[uid]:
                    self.problems[uid] = (
                        f"unit {uid} was recorded for frames {record['frames']} but the plan has "
                        f"{list(plan[uid])}"
                    )
                    continue
            if verify:
                try:
                    actual = sha256_file(path)
                except FileNotFoundError:
                    self.problems[uid] = f"part {path} of unit {uid} is missing"
                    continue
                except OSError as exc:
                    self.problems[uid] = f"part {path} of unit {uid} is unreadable: {exc.strerror}"
                    continue
                if actual != record["sha256"]:
                    self.problems[uid] = f"part {path} of unit {uid} is corrupt (sha256 mismatch)"
                    continue
            done[uid] = record
        for uid, reason in sorted(self.problems.items()):
            log.warning("%s; it will be redone", reason)
        return done

    def status(self, verify: bool = False) -> Dict[str, Any]:
        """Progress from the plan and the journal.

        Returns ``{"n_units", "done", "failed", "pending", "frames_done", "n_frames",
        "problems", "journal_skipped"}``; the three lists hold unit ids, sorted. ``verify``
        hashes every part (slow on big runs); otherwise the journal is trusted. A unit whose
        latest record is a failure is in ``failed`` only; one with a rejected part is pending.
        """
        manifest = self.read_manifest()
        plan = self.plan_units(manifest)
        journal = self.read_journal()
        completed = self._accept(journal, plan, verify)
        done = sorted(u for u in plan if u in completed)
        failed = sorted(
            u for u in plan if u not in completed and journal.get(u, {}).get("status") == "failed"
        )
        pending = sorted(set(plan) - set(done) - set(failed))
        n_frames = manifest["plan"].get("n_frames")
        if not _is_int(n_frames):
            n_frames = sum(stop - start for start, stop in plan.values())
        return {
            "n_units": len(plan),
            "done": done,
            "failed": failed,
            "pending": pending,
            "frames_done": sum(plan[u][1] - plan[u][0] for u in done),
            "n_frames": n_frames,
            "problems": {u: r for u, r in self.problems.items() if u in plan},
            "journal_skipped": self.journal_skipped,
        }

    # -- lock ----------------------------------------------------------------------------------

    def lock(self, **kwargs: Any) -> "WorkDirLock":
        """A (not yet acquired) :class:`WorkDirLock` on this directory; use it as ``with``."""
        return WorkDirLock(self.lock_path, **kwargs)


def _validate_manifest(manifest: Any, where: str, on_error: type) -> None:
    fix = "rerun with --force-replan or delete the work directory"
    if not isinstance(manifest, dict):
        raise on_error(f"manifest {where} is corrupt (not a JSON object); {fix}")
    version = manifest.get("version")
    if not _is_int(version) or version != MANIFEST_VERSION:
        raise on_error(
            f"manifest {where} has version {version!r}, this xvr_batch reads version "
            f"{MANIFEST_VERSION}; {fix}"
        )
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise on_error(f"manifest {where} is corrupt (missing {', '.join(missing)}); {fix}")
    if not isinstance(manifest["plan"], dict):
        raise on_error(f"manifest {where} is corrupt (plan is not an object); {fix}")


def _parse_record(line: bytes) -> Optional[Dict[str, Any]]:
    """A validated journal record, or None for anything damaged."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    crc = record.get("crc")
    unit = record.get("unit")
    t = record.get("t")
    if not isinstance(crc, str) or not _is_int(unit) or unit < 0:
        return None
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
        return None
    status = record.get("status", "done")
    if status == "done":
        part, sha, frames = record.get("part"), record.get("sha256"), record.get("frames")
        if not isinstance(part, str) or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            return None
        if not (isinstance(frames, list) and len(frames) == 2 and all(_is_int(f) for f in frames)):
            return None
        if not 0 <= frames[0] <= frames[1]:
            return None
    elif status == "failed":
        if not isinstance(record.get("error"), str):
            return None
    else:
        return None
    try:
        if journal_crc(record) != crc:
            return None
    except ValueError:  # NaN/inf somewhere in extra fields: cannot be canonical
        return None
    return record


# ----------------------------------------------------------------------------------------------
# Lock
# ----------------------------------------------------------------------------------------------

#: flock errors meaning "this filesystem does not do flock", which trigger the pid-file fallback.
_NO_FLOCK_ERRNOS = frozenset(
    {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs on this host (zombies count as dead; other users' as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return True


class WorkDirLock:
    """Exclusive lock on a work directory, held from :meth:`acquire` to :meth:`release`.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``lock``, through a descriptor kept open while held; the
    file holds ``{"pid", "host", "started"}`` of the holder for messages. The kernel releases the
    lock when the holder dies, even on SIGKILL, so a lock file left by a dead run is taken over
    silently (logged at debug level). The descriptor is close-on-exec but is shared with children
    created by a bare ``fork()``: while such a child lives, the lock stays held, and a new run is
    refused with a message naming the dead parent.

    ``use_flock=None`` detects filesystems without flock (ENOSYS, ENOLCK, ...) and falls back to
    an exclusive-create pid file, where a holder on this host that is no longer alive is taken
    over and a holder on another host must be removed by hand. ``grace_s`` is how long a
    contended lock whose record is empty or names a dead process is retried (its new holder may
    still be writing its record) before giving up.
    """

    def __init__(self, path: PathLike, *, use_flock: Optional[bool] = None, grace_s: float = 2.0):
        self.path: pathlib.Path = pathlib.Path(os.path.abspath(os.fspath(path)))
        self.workdir: pathlib.Path = self.path.parent
        self.use_flock = use_flock
        self.grace_s = float(grace_s)
        self._fd: Optional[int] = None
        self._mode: Optional[str] = None  # "flock" or "pidfile" while held
        self._record: Optional[bytes] = None

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def __enter__(self) -> "WorkDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _make_record(self) -> bytes:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")

    def read_holder(self) -> Optional[Dict[str, Any]]:
        """The holder record in the lock file, or None if absent, empty or unparseable."""
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None
        return _parse_holder(raw)

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming who holds it."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.use_flock is not False:
            try:
                self._acquire_flock()
                return
            except _FlockUnsupported as exc:
                if self.use_flock:
                    raise OSError(exc.errno, f"flock is not supported on {self.path}") from None
                log.warning(
                    "flock is not supported on %s (%s); falling back to a pid file lock",
                    self.workdir, os.strerror(exc.errno),
                )
        self._acquire_pidfile()

    def release(self) -> None:
        """Release the lock (idempotent). The lock file itself stays in flock mode."""
        fd, mode, record = self._fd, self._mode, self._record
        if fd is None:
            return
        self._fd = self._mode = self._record = None
        try:
            if mode == "flock":
                try:
                    os.ftruncate(fd, 0)  # no stale holder info for the next reader
                except OSError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                try:
                    if self.path.read_bytes() == record:
                        os.unlink(self.path)
                except OSError:
                    pass
        finally:
            os.close(fd)

    # -- flock mode ----------------------------------------------------------------------------

    def _acquire_flock(self) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        created = False
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
        except OSError as exc:
            raise UserError(
                f"cannot open lock file {self.path}: {exc.strerror}; check that the work directory "
                "is writable (and that lock is not a symlink)"
            ) from None
        deadline = time.monotonic() + self.grace_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno in _NO_FLOCK_ERRNOS:
                        if created:  # leave no empty file for the pid-file fallback to wait on
                            os.unlink(self.path)
                        raise _FlockUnsupported(exc.errno) from None
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                holder = self.read_holder()
                if holder is not None and not _holder_dead_here(holder):
                    raise UserError(_in_use_message(self.workdir, holder))
                if time.monotonic() >= deadline:
                    if holder is None:
                        raise UserError(
                            f"{self.workdir} is in use by another process ({self.path} is "
                            "locked but names no holder); wait for it or stop it "
                            f"(fuser -v {self.path} lists it)"
                        )
                    raise UserError(
                        f"{self.workdir} is locked by a leftover child of pid {holder['pid']} on "
                        f"host {holder['host']} (started {holder['started']}), which is no longer "
                        f"running; stop the leftover processes (fuser -v {self.path} lists them) "
                        "and rerun"
                    )
                time.sleep(0.05)
            previous = _parse_holder(os.pread(fd, 4096, 0))
            if previous is not None:
                log.debug(
                    "taking over lock %s left by pid %s on host %s (started %s)",
                    self.path, previous["pid"], previous["host"], previous["started"],
                )
            record = self._make_record()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mode, self._record = fd, "flock", record

    # -- pid file mode ---------------------------------------------------------------------------

    def _acquire_pidfile(self) -> None:
        deadline = time.monotonic() + self.grace_s
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        while True:
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileExistsError:
                pass
            else:
                record = self._make_record()
                try:
                    os.write(fd, record)
                    os.fsync(fd)
                    fsync_dir(self.workdir)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._mode, self._record = fd, "pidfile", record
                return
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = _parse_holder(raw)
            if holder is not None and not _holder_dead_here(holder):
                hint = ""
                if holder["host"] != socket.gethostname():
                    hint = f" (if that process is gone, delete {self.path})"
                raise UserError(_in_use_message(self.workdir, holder, hint))
            if holder is None and time.monotonic() < deadline:
                time.sleep(0.05)  # its creator may still be writing it
                continue
            log.debug(
                "taking over stale lock %s (%s)", self.path, raw[:200].decode("utf-8", "replace")
            )
            self._remove_stale(raw)

    def _remove_stale(self, judged: bytes) -> None:
        """Remove the lock file if it still holds ``judged``; put back anything else."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != judged:
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


class _FlockUnsupported(Exception):
    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


def _parse_holder(raw: bytes) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or not _is_int(info.get("pid")):
        return None
    return {
        "pid": info["pid"],
        "host": str(info.get("host", "?")),
        "started": str(info.get("started", "?")),
    }


def _holder_dead_here(holder: Dict[str, Any]) -> bool:
    return holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"])


def _in_use_message(workdir: pathlib.Path, holder: Dict[str, Any], hint: str = "") -> str:
    return (
        f"{workdir} is in use by pid {holder['pid']} on host {holder['host']} since "
        f"{holder['started']}; wait for it or stop it{hint}"
    )
