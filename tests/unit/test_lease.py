"""One driver per search: the lease in the Optuna study, on a real sqlite storage."""

from __future__ import annotations

import time

import optuna
import pytest

from safemerge.errors import UserError
from safemerge.search import lease as lease_module
from safemerge.search.lease import LEASE_ATTR, DriverLease


@pytest.fixture
def storage(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    optuna.create_study(study_name="s", storage=storage)
    return storage


def test_a_second_driver_refuses_while_the_first_holds_the_lease(storage):
    with DriverLease("s", storage, timeout_s=60) as first:
        with pytest.raises(UserError, match="'s' is being run by another driver .* heartbeat 0 s ago"):
            DriverLease("s", storage, timeout_s=60).acquire()
        assert first.holder()["id"] == first.owner["id"]
    with DriverLease("s", storage, timeout_s=60) as second:  # given back: taken at once
        assert second.took_stale is None


def test_the_heartbeat_keeps_a_lease_fresh_and_a_dead_drivers_goes_stale(storage):
    with DriverLease("s", storage, timeout_s=0.4) as first:
        time.sleep(0.9)  # past the timeout: only the heartbeat keeps it
        with pytest.raises(UserError, match="another driver"):
            DriverLease("s", storage, timeout_s=0.4).acquire()
    dead = {"id": "dead", "host": "h", "pid": 1, "heartbeat": time.time() - 5}
    storage.set_study_user_attr(storage.get_study_id_from_name("s"), LEASE_ATTR, dead)
    with DriverLease("s", storage, timeout_s=1) as second:
        assert second.took_stale == dead and first.holder()["id"] == second.owner["id"]
