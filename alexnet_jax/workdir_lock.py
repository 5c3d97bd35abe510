"""One trainer per workdir: an exclusive lock, `DIR/LOCK`, taken before the trainer writes anything there.

The lock holds a JSON record: host, pid, since (when it was taken) and heartbeat (refreshed by a background
thread every `timeout / 6` seconds). Two trainers in one workdir would delete each other's checkpoints and
interleave their metrics, so a second one is refused; a lock whose holder is gone is taken over.

- Local or shared filesystems: an OS file lock (flock) on DIR/LOCK, which the kernel (or the NFS lock server)
  drops when the holder dies, plus the record. Where the filesystem has no file locks, the record alone decides.
- gs:// workdirs: an object DIR/LOCK created with the precondition "no such object yet" (ifGenerationMatch=0);
  the heartbeat rewrites it on the condition that it is still the holder's own generation.

Judging an existing lock:
- live (this host: the file lock is held, or without file locks its pid is alive) -> WorkdirBusy naming it;
- gone (this host: file lock free, or pid dead) or stale (heartbeat older than `timeout`) -> taken over, with a
  warning;
- on another host with a recent heartbeat, which may be a live trainer or one that died a moment ago (a job
  requeued after a hard kill): wait, up to `timeout`, and watch. A heartbeat that moves means a live holder
  (WorkdirBusy); one that stops moving for `timeout` means the holder is gone, and the lock is taken over.

Multi-process runs: process 0 alone takes the lock; the others follow its verdict (shared at each step of a
wait, so every process goes on together or raises together).
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from urllib.parse import quote

from absl import logging

from alexnet_jax import storage

LOCK_NAME = "LOCK"
DEFAULT_TIMEOUT_S = 300.0  # the `workdir_lock_timeout_s` config key: a heartbeat this old means the holder is gone
_MESSAGE_BYTES = 1024  # room for the verdict process 0 shares with the others


class LockError(Exception):
    """The workdir cannot be locked (not writable, storage refused): one line, exit 2."""


class WorkdirBusy(LockError):
    """Another live trainer holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Record:
    host: str
    pid: int
    since: float
    heartbeat: float
    token: str  # tells two holders apart even when host and pid repeat

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self)) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> "Record | None":
        """None for an empty or damaged record (a holder between creating and writing it, or a torn write)."""
        try:
            fields = json.loads(data)
            return cls(str(fields["host"]), int(fields["pid"]), float(fields["since"]), float(fields["heartbeat"]),
                       str(fields["token"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (f"pid {self.pid} on host {self.host} since {since} (heartbeat {max(now - self.heartbeat, 0):.0f} s "
                "ago)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _LocalStore:
    """DIR/LOCK on a filesystem: an OS file lock on it, and the record inside. Where the filesystem has no file
    locks, creating the file exclusively is the lock and the record alone tells whether its holder is gone."""

    def __init__(self, workdir: str):
        self.workdir, self.path = workdir, os.path.join(workdir, LOCK_NAME)
        self.file_locks = True
        self._fd = None
        self._made_workdir = False

    def grab(self, mine: Record) -> bool:
        """True if we now hold the lock: the file lock taken (our record not yet written: the old one is still
        there to judge), or, without file locks, the file created with our record."""
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir, exist_ok=True)
            self._made_workdir = True
        while True:
            if not self.file_locks:
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                self.write(mine)
                return True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as error:  # ENOLCK, EOPNOTSUPP: e.g. Lustre mounted without flock
                os.close(fd)
                logging.warning("No file locks on the filesystem of %s (%s): the lock record alone guards it",
                                self.path, error.strerror)
                self.file_locks = False
                continue
            try:  # the holder released (and removed) the file between our open and flock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def read(self) -> tuple[Record | None, None]:
        try:
            with open(self.path, "rb") as f:
                return Record.parse(f.read()), None
        except FileNotFoundError:
            return None, None

    def write(self, record: Record) -> None:
        data = record.to_bytes()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def let_go(self) -> None:
        """Drops a file lock taken only for a look, leaving the file (and the record in it) as it is."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self, _tag) -> None:
        """Removes a lock file whose holder is gone (needed only without file locks)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, so nobody locks the old file after we let go (see grab's inode check).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.let_go()
        if self._made_workdir:  # a run refused before it wrote anything leaves no empty workdir behind
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)

    def close_in_child(self) -> None:
        """A forked child (a data worker) must not keep the lock alive after the trainer dies."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class _GcsStore:
    """gs://BUCKET/DIR/LOCK, an object written only under generation preconditions, through gcsfs's client."""

    file_locks = False

    def __init__(self, workdir: str):
        import gcsfs

        self.path = storage.join(workdir, LOCK_NAME)
        self._fs = gcsfs.GCSFileSystem()
        self._bucket, self._key = self.path[len("gs://"):].split("/", 1)
        self._generation = None  # of our own record, while we hold it

    def _upload(self, record: Record, if_generation: str) -> str:
        """One multipart upload (object metadata, then the record) under `ifGenerationMatch` ("0": create only).
        Multipart rather than a media upload: emulators such as fake-gcs-server check preconditions only there."""
        url = f"{self._fs._location}/upload/storage/v1/b/{quote(self._bucket, safe='')}/o"
        body = (f"--lock\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps({'name': self._key})}"
                "\r\n--lock\r\nContent-Type: application/json\r\n\r\n").encode() + record.to_bytes() + b"\r\n--lock--"
        result = self._fs.call("POST", url, uploadType="multipart", ifGenerationMatch=if_generation,
                               headers={"Content-Type": 'multipart/related; boundary="lock"'}, data=body,
                               json_out=True)
        return str(result["generation"])

    def grab(self, mine: Record) -> bool:
        try:
            self._generation = self._upload(mine, "0")  # create only: 412 (FileExistsError) if the object exists
        except FileExistsError:
            return False
        return True

    def read(self) -> tuple[Record | None, str | None]:
        try:
            info = self._fs.call("GET", "b/{}/o/{}", self._bucket, self._key, json_out=True)
            _, data = self._fs.call("GET", "b/{}/o/{}", self._bucket, self._key, alt="media",
                                    generation=info["generation"])
        except FileNotFoundError:
            return None, None
        return Record.parse(data), str(info["generation"])

    def write(self, record: Record) -> None:
        """The heartbeat: only over our own generation (FileExistsError once someone has taken the lock over)."""
        self._generation = self._upload(record, self._generation)

    def let_go(self) -> None:
        pass

    def _delete(self, generation) -> None:
        with contextlib.suppress(FileNotFoundError, FileExistsError):  # gone already, or someone else's by now
            self._fs.call("DELETE", "b/{}/o/{}", self._bucket, self._key, ifGenerationMatch=generation)

    def remove(self, generation) -> None:
        if generation is not None:
            self._delete(generation)

    def release(self) -> None:
        if self._generation is not None:
            self._delete(self._generation)
            self._generation = None

    def close_in_child(self) -> None:
        pass


def _judge(record: Record, now: float, timeout: float, this_host: str, file_lock: bool | None) -> str:
    """"live", "gone", "stale" or "unsure" (another host, a recent heartbeat: watch it) for a lock record.
    `file_lock`: whether we got the OS file lock (None where there is none)."""
    age = now - record.heartbeat
    if record.host == this_host:
        if file_lock is not None:  # the kernel knows: a dead holder's file lock is released
            return "gone" if file_lock else "live"
        if not _pid_alive(record.pid):
            return "gone"
        return "stale" if age >= timeout else "live"
    return "stale" if age >= timeout else "unsure"


def acquisition(workdir: str, timeout: float, poll: float | None = None):
    """Taking the lock, as a generator: it yields (each time after sleeping `poll` s) while it waits for a holder
    on another host to show whether it is alive; it returns the store that holds the lock now, or raises
    WorkdirBusy. Stepped from outside so that the processes of a multi-process run can agree at every step."""
    poll = min(2.0, timeout / 10) if poll is None else poll
    store = _GcsStore(workdir) if storage.is_remote(workdir) else _LocalStore(workdir)
    host, token = socket.gethostname(), uuid.uuid4().hex
    watched = watch_started = unreadable_since = None
    while True:
        now = time.time()
        mine = Record(host, os.getpid(), now, now, token)
        got = store.grab(mine)
        held, tag = store.read()
        if held is not None and held.token == token:
            return store  # created with our record (no file locks)
        if held is None:
            if got:  # the file lock, and no record from anyone before us
                store.write(mine)
                return store
            # The holder has not written its record yet (or we read it mid-write): look again shortly.
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since > 10:
                raise WorkdirBusy(f"{store.path} is held by a trainer whose record cannot be read; if no trainer "
                                  "uses this workdir, delete that file")
            time.sleep(0.1)
            continue
        unreadable_since = None
        verdict = _judge(held, now, timeout, host, got if store.file_locks else None)
        if verdict == "unsure" and watched is not None:
            if (held.token, held.heartbeat) != (watched.token, watched.heartbeat):
                verdict = "live"  # its heartbeat moved
            elif time.monotonic() - watch_started >= timeout:
                verdict = "stale"  # unchanged for a whole timeout by our own clock, whatever the holder's says
        if verdict == "live" or (store.file_locks and not got and verdict != "unsure"):
            store.let_go()
            still = "" if verdict == "live" else " (its heartbeat is stale, but its file lock is still held)"
            raise WorkdirBusy(f"workdir {workdir} is in use by the trainer {held.describe(now)}{still}; stop it or "
                              "use another --workdir")
        if verdict == "unsure":
            if watched is None:
                watched, watch_started = held, time.monotonic()
                logging.warning(
                    "%s is held by the trainer %s: waiting up to %.0f s for its heartbeat to go stale (a restarted "
                    "job's previous holder) or to move (a live trainer)", store.path, held.describe(now),
                    min(max(timeout - (now - held.heartbeat), 0) + poll, timeout))
            store.let_go()
            time.sleep(poll)
            yield
            continue
        why = "is gone" if verdict == "gone" else f"has not refreshed its heartbeat for over {timeout:.0f} s"
        logging.warning("Taking over %s: its holder, the trainer %s, %s", store.path, held.describe(now), why)
        if got:  # the file lock is ours: replace the record
            store.write(mine)
            return store
        store.remove(tag)  # then create it afresh
        watched = None


class _Heartbeat:
    """Refreshes the holder's record every `interval` seconds until stopped."""

    def __init__(self, store, record: Record, interval: float):
        self._store, self._record, self._interval = store, record, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._interval):
            self._record = dataclasses.replace(self._record, heartbeat=time.time())
            try:
                self._store.write(self._record)
            except FileExistsError:  # a generation precondition failed
                logging.error("%s was taken over by another trainer: this one no longer holds its workdir",
                              self._store.path)
                return
            except Exception as error:  # a storage hiccup: the next beat tries again, well within the timeout
                logging.warning("Could not refresh %s: %s", self._store.path, error)

    def stop(self):
        self._stop.set()
        self._thread.join()


def _run_to_end(steps):
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


_WAITING, _TAKEN, _REFUSED = 0, 1, 2


def _agree(status: int, message: str) -> tuple[int, str]:
    """Process 0's status and message, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    encoded = message.encode()[:_MESSAGE_BYTES]
    buffer = np.zeros(_MESSAGE_BYTES + 2, np.int32)
    buffer[0], buffer[1], buffer[2:2 + len(encoded)] = status, len(encoded), list(encoded)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return int(shared[0]), bytes(shared[2:2 + int(shared[1])].astype(np.uint8)).decode(errors="replace")


def _acquire_together(workdir: str, timeout: float):
    """Process 0 takes the lock; at each step of its wait every process learns how it stands, so all go on or
    all raise together (and no collective waits longer than one poll)."""
    import jax

    steps = acquisition(workdir, timeout) if jax.process_index() == 0 else None
    while True:
        status, message, store = _WAITING, "", None
        if steps is not None:
            try:
                next(steps)
            except StopIteration as done:
                status, store = _TAKEN, done.value
            except LockError as error:
                status, message = _REFUSED, str(error)
            except OSError as error:
                status, message = _REFUSED, _os_error_message(workdir, error)
        status, message = _agree(status, message)
        if status == _REFUSED:
            raise (WorkdirBusy if "is in use by" in message else LockError)(message)
        if status == _TAKEN:
            return store


def _os_error_message(workdir: str, error: OSError) -> str:
    where = getattr(error, "filename", None) or workdir
    return f"cannot lock workdir {workdir}: {where}: {error.strerror or error}"


@contextlib.contextmanager
def hold(workdir: str, timeout: float = DEFAULT_TIMEOUT_S):
    """Holds DIR/LOCK (see the module docstring) for the `with` block, on process 0 of a multi-process run; the
    lock is released however the block ends. Raises WorkdirBusy (another live trainer holds it) or LockError."""
    import jax

    if timeout <= 0:
        raise LockError(f"workdir_lock_timeout_s must be > 0, not {timeout}")
    if jax.process_count() > 1:
        store = _acquire_together(workdir, timeout)
    else:
        try:
            store = _run_to_end(acquisition(workdir, timeout))
        except OSError as error:
            raise LockError(_os_error_message(workdir, error)) from None
    if store is None:  # not process 0
        yield
        return
    _held.append(store)
    heartbeat = _Heartbeat(store, store.read()[0], timeout / 6)
    try:
        yield
    finally:
        heartbeat.stop()
        store.release()
        _held.remove(store)


_held = []  # the locks this process holds


def _close_in_child():
    for store in _held:
        store.close_in_child()
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
