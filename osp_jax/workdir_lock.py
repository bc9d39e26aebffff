"""One writer per workdir: `WORKDIR/train.lock`, taken by process 0 of a training job before it touches the
workdir, and held until the run ends.

A second `train` on a workdir in use stops with `WorkdirBusy` (exit 2) naming the holder: host, PID, start time.

- **Local disk**: `fcntl.flock` on the file. The kernel drops the lock when its holder dies, SIGKILL included,
  so a lock left behind by a dead process is simply taken by the next run; the file is removed at release, and
  a process that locked a file removed meanwhile tries again (it compares inodes).
- **gs://**: an object created only if absent (`if_generation_match=0`, google-cloud-storage), rewritten every
  `HEARTBEAT_S` seconds, each write conditional on the generation the holder wrote last. A lock is stale when
  its holder is known dead (same host and boot, PID gone or reused) or its last write is older than
  `STALE_AFTER_S`; it is taken over by a write conditional on the stale generation, so of two processes taking
  over at once exactly one succeeds. A holder whose heartbeat finds the lock taken stops its process at once:
  two writers must never run on.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time

from etils import epath

from osp_jax import cli, storage

log = logging.getLogger("osp_jax")

LOCK_NAME = "train.lock"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0


class WorkdirBusy(cli.UserError):
    """Another process holds the workdir (or it cannot be locked): the message names the holder."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), '' if unknown: tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str          # UTC, ISO 8601
    boot_id: str = ""
    pid_start: str = ""

    @classmethod
    def me(cls) -> "Holder":
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), now, _boot_id(), _process_start(os.getpid()))

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d["started"]), str(d.get("boot_id", "")),
                       str(d.get("pid_start", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    def describe(self) -> str:
        return f"host {self.host}, PID {self.pid}, started {self.started}"

    def known_dead(self) -> bool:
        """Whether this holder is a process of this machine's current boot that no longer runs."""
        if self.host != socket.gethostname() or not self.boot_id or self.boot_id != _boot_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return bool(self.pid_start) and _process_start(self.pid) not in ("", self.pid_start)


def _busy(path, holder: "Holder | None", extra: str = "") -> WorkdirBusy:
    who = holder.describe() if holder else "a process that has not written its name yet"
    return WorkdirBusy(f"the workdir is in use: {path} is held by {who}{extra}; wait for that run to end, or "
                       "train into another --workdir")


class _LocalLock:
    def __init__(self, path: str):
        self.path, self._fd, self.me = path, None, Holder.me()

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(self.path, self._read_holder()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # removed by the holder that just released it: lock the new file
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.me.to_json().encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _read_holder(self, wait_s: float = 1.0) -> Holder | None:
        """The holder's name; it writes it just after locking, so a moment is allowed for it to appear."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with open(self.path, encoding="utf-8") as f:
                    holder = Holder.parse(f.read())
            except OSError:
                holder = None
            if holder or time.monotonic() > deadline:
                return holder
            time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            os.unlink(self.path)  # while still locked: a waiting process then locks a new file
            os.close(self._fd)
            self._fd = None


class _GcsLock:
    def __init__(self, path: str):
        self.path, self.me = path, Holder.me()
        bucket, self._name = storage.split_gs(path)
        self._bucket = storage.gcs_client().bucket(bucket)
        self.generation = None
        self._stop = threading.Event()
        self._thread = None

    def acquire(self, tries: int = 5) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(tries):
            try:
                self._write(0)
                break
            except PreconditionFailed:
                pass
            current = self._bucket.get_blob(self._name)
            if current is None:  # released meanwhile: try again
                continue
            try:
                holder = Holder.parse(current.download_as_text(if_generation_match=current.generation))
            except (NotFound, PreconditionFailed):
                continue
            age = (datetime.datetime.now(datetime.timezone.utc) - current.updated).total_seconds()
            if not (holder is None or holder.known_dead() or age > STALE_AFTER_S):
                raise _busy(self.path, holder, f", its last heartbeat {age:.0f} s ago (a lock with none for "
                                               f"{STALE_AFTER_S:.0f} s is taken over)")
            try:
                self._write(current.generation)
            except PreconditionFailed:  # another process took it over first
                continue
            log.warning("took over the stale lock %s of %s (%s)", self.path,
                        holder.describe() if holder else "an unknown holder",
                        "that process is gone" if holder and holder.known_dead() else f"no heartbeat for {age:.0f} s")
            break
        else:
            raise WorkdirBusy(f"could not take the workdir lock {self.path} in {tries} tries: other processes keep "
                              "taking it")
        self._thread = threading.Thread(target=self._heartbeat, name="osp_jax-workdir-lock", daemon=True)
        self._thread.start()

    def _write(self, if_generation: int) -> None:
        blob = self._bucket.blob(self._name)
        blob.upload_from_string(self.me.to_json(), content_type="application/json", if_generation_match=if_generation)
        self.generation = blob.generation

    def _heartbeat(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        failing_since = None
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(self.generation)
                failing_since = None
            except (PreconditionFailed, NotFound):
                log.error("lost the workdir lock %s: another process took it over (this one's heartbeats failed "
                          "for over %.0f s); stopping now so that two runs never write the workdir",
                          self.path, STALE_AFTER_S)
                logging.shutdown()
                os._exit(cli.EXIT_USER)
            except Exception as e:  # noqa: BLE001 - a network error: try again at the next beat
                failing_since = failing_since or time.monotonic()
                log.warning("the workdir lock's heartbeat failed (%s); retrying (failing for %.0f s)",
                            cli.one_line(e), time.monotonic() - failing_since)

    def release(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is not None:
            try:
                self._bucket.blob(self._name).delete(if_generation_match=self.generation)
            except (NotFound, PreconditionFailed):
                pass
            self.generation = None


class WorkdirLock:
    """The lock on `workdir` (`LOCK_NAME` in it): `acquire()`, or WorkdirBusy (held by another process) or
    cli.UserError (a gs:// workdir that cannot be written: the bucket, credentials, a permission); `release()`;
    a context manager.
    A local workdir this lock made, and left empty when released, is removed with it: a refused run leaves
    nothing behind."""

    def __init__(self, workdir):
        self.workdir = os.fspath(workdir)
        self.path = os.fspath(epath.Path(workdir) / LOCK_NAME)
        self._impl = None
        self._made_dir = False

    def acquire(self) -> "WorkdirLock":
        if storage.is_remote(self.workdir):
            try:
                impl = _GcsLock(self.path)
                impl.acquire()
            except WorkdirBusy:
                raise
            except Exception as e:  # noqa: BLE001 - a bucket, credentials or permission problem
                raise cli.UserError(f"--workdir={self.workdir}: cannot write there: {storage.cause(e)}") from None
        else:
            self._made_dir = not os.path.isdir(self.workdir)
            os.makedirs(self.workdir, exist_ok=True)
            impl = _LocalLock(self.path)
            try:
                impl.acquire()
            except BaseException:
                self._remove_made_dir()
                raise
        self._impl = impl
        return self

    def release(self) -> None:
        if self._impl is not None:
            self._impl.release()
            self._impl = None
            self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        if self._made_dir:
            try:
                os.rmdir(self.workdir)  # only if empty
            except OSError:
                pass
            self._made_dir = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
