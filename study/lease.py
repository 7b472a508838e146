"""One driver per study on object storage: a lease, ``<uri>/<name>/driver.lease``.

An object store has no lock, and the working copy's ``flock`` (:mod:`study.lock`) only stops a second
driver on the same machine in the same directory. So the driver holds a lease on the URI: an object
naming its host and PID, rewritten every ``RENEW_S`` seconds by a thread of the driver, deleted when
the driver ends. A second driver refuses to start, in one line naming the holder, where the lease is

* of another host and was renewed less than ``LEASE_S`` seconds ago (by the object store's clock:
  the age is the difference of two of its modification times, so the machines' clocks do not
  matter); a SIGKILLed driver's lease is taken over once that time has passed;
* of this host and names a live process (a SIGKILLed driver's lease is taken over at once).

Two drivers started within the same second on different hosts can both pass (an object store has no
compare-and-swap); each re-reads the lease after writing it and the one whose lease was overwritten
refuses, which leaves a window of a network round trip. Standard library and pyarrow only.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import IO, Any

from study.storage import RemoteStudy, StorageError, first_line

LEASE_FILE = "driver.lease"
LEASE_S = 120.0  # a lease not renewed for this long is a dead driver's
RENEW_S = 30.0
SETTLE_S = 1.0  # between writing the lease and reading it back


class StudyLeased(Exception):
    """Another live driver holds the study's lease; the message is one line naming it."""


class Lease:
    """This driver's lease on ``remote`` (:meth:`claim`, then :meth:`close`)."""

    def __init__(self, remote: RemoteStudy, renew_s: float = RENEW_S, lease_s: float = LEASE_S) -> None:
        self.remote, self.renew_s, self.lease_s = remote, renew_s, lease_s
        self.mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> None:
        """Take the lease, or raise :class:`StudyLeased` naming the live holder."""
        held = self._holder()
        if held is not None:
            info, age = held
            if self._alive(info, age):
                raise StudyLeased(
                    f"study {self.remote.shown} is in use by another driver (pid {info.get('pid')} on host "
                    f"{info.get('host')}, its lease renewed {age:.0f} s ago); wait for it to finish or stop it "
                    f"(a driver that was killed gives up its lease after {self.lease_s:.0f} s, at once on its own host)"
                )
        self.remote.write_bytes(LEASE_FILE, self.mine.encode())
        time.sleep(SETTLE_S)
        now = self.remote.read_bytes(LEASE_FILE)
        if now is not None and now.decode() != self.mine:  # another driver wrote it meanwhile
            info = json.loads(now)
            raise StudyLeased(
                f"study {self.remote.shown} was claimed by another driver at the same moment (pid "
                f"{info.get('pid')} on host {info.get('host')}); run one driver per study"
            )
        self._thread = threading.Thread(target=self._renew, name="study-lease", daemon=True)
        self._thread.start()

    def _holder(self) -> tuple[dict[str, Any], float] | None:
        """The lease on the URI and its age in seconds (by the store's clock), or None."""
        import pyarrow.fs as pafs

        data = self.remote.read_bytes(LEASE_FILE)
        if data is None:
            return None
        try:
            info = json.loads(data)
        except ValueError:
            return None  # a lease cut short: nobody's
        probe = f".lease_probe_{os.getpid()}"
        self.remote.write_bytes(probe, b"")
        stamps = self.remote.fs.get_file_info([self.remote.remote(LEASE_FILE), self.remote.remote(probe)])
        self.remote.fs.delete_file(self.remote.remote(probe))
        if any(s.type == pafs.FileType.NotFound or s.mtime_ns is None for s in stamps):
            return info, 0.0
        return info, max(0.0, (stamps[1].mtime_ns - stamps[0].mtime_ns) / 1e9)

    def _alive(self, info: dict[str, Any], age: float) -> bool:
        """Whether the lease's holder may still be running."""
        if info.get("host") != socket.gethostname():
            return age < self.lease_s
        pid = int(info.get("pid", 0))
        if pid <= 0 or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.remote.write_bytes(LEASE_FILE, self.mine.encode())
            except (OSError, StorageError) as exc:  # tried again at the next renewal
                print(f"warning: could not renew the study's lease on {self.remote.shown}: {first_line(exc)}")

    def close(self) -> None:
        """Stop renewing and delete the lease (where it is still this driver's)."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=5)
        self._thread = None
        try:
            if (self.remote.read_bytes(LEASE_FILE) or b"").decode() == self.mine:
                self.remote.fs.delete_file(self.remote.remote(LEASE_FILE))
        except (OSError, StorageError):
            pass  # it expires


class Held:
    """The working copy's lock file and the lease on the URI, released together (``plan.lock``)."""

    def __init__(self, lock: IO[str], lease: Lease) -> None:
        self.lock, self.lease = lock, lease

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lease.close()
        self.lock.close()
