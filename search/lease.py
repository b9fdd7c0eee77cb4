"""One driver per search: a lease held in the search's own Optuna study (a study attribute with a heartbeat), so
every driver that can reach the storage sees it, on any machine.

A driver takes the lease when there is none, when it is its own, or when the holder's heartbeat is older than
the lease's timeout (the holder was killed, or lost its node); it renews it from a background thread and gives
it back when it ends. A second driver on the same search name refuses while the lease is fresh. Only a driver
that holds the lease puts RUNNING trials back in the queue, and it takes a stale lease only, so it never
re-queues trials a live driver is running.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from types import TracebackType

import optuna

from safemerge.errors import UserError

LEASE_ATTR = "safemerge.driver_lease"
SETTLE_S = 1.0  # two drivers that took a stale lease at once: the later write wins, the other sees it and leaves


class DriverLease:
    """The lease of search `study_name` in `storage`, held for as long as the `with` block runs."""

    def __init__(self, study_name: str, storage: optuna.storages.BaseStorage, timeout_s: float):
        """`timeout_s`: the config's lease_timeout_s; the holder renews the lease every quarter of it."""
        self.study_name, self.storage, self.timeout_s = study_name, storage, timeout_s
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_stale: dict | None = None  # the dead holder's lease this driver replaced, if any

    def _study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.study_name)

    def holder(self) -> dict | None:
        return self.storage.get_study_user_attrs(self._study_id()).get(LEASE_ATTR)

    def _write(self, heartbeat: float) -> None:
        self.storage.set_study_user_attr(self._study_id(), LEASE_ATTR, {**self.owner, "heartbeat": heartbeat})

    def _refuse_if_held(self) -> None:
        holder = self.holder()
        if not holder or holder.get("id") == self.owner["id"]:
            return
        age = time.time() - float(holder.get("heartbeat", 0))
        if age < self.timeout_s:
            raise UserError(
                f"search {self.study_name!r} is being run by another driver (pid {holder.get('pid')} on "
                f"{holder.get('host')}, heartbeat {age:.0f} s ago); wait for it to finish, or, if it was killed, "
                f"resume the search once its lease is stale (in {self.timeout_s - age:.0f} s)"
            )
        if holder.get("heartbeat"):
            self.took_stale = holder

    def acquire(self) -> None:
        self._refuse_if_held()
        self._write(time.time())
        time.sleep(SETTLE_S)
        self._refuse_if_held()  # another driver wrote after us: it holds the lease
        self._thread = threading.Thread(target=self._beat, name="safemerge-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self._write(time.time())
            except Exception:  # the storage is briefly unreachable: the next beat tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        if holder and holder.get("id") == self.owner["id"]:
            self._write(0.0)  # stale at once: the next driver need not wait

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
