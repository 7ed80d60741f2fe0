"""The autoscaler's loop: once a second, every autoscaled version's load in, scale operations out.

It runs in the health monitor's process (``cloudml-os monitor``), which already reads every ready replica's
load counters with its probes (:meth:`HealthMonitor.rates`). Decisions come from
:class:`cloudml_os.serving.autoscaler.Scaler`; a decision becomes what ``versions.patch`` of the replica
count makes: the version goes READY → UPDATING with its new count (compare-and-set, so a user's change or
another monitor's wins cleanly), an ``UPDATE_VERSION`` operation and an ``AUTOSCALE`` event saying why, and
the serving workflow starts or drains replicas. A version with an operation under way is observed but not
changed. A scale-out stops at the project's quota, with a ``QUOTA`` event. The loop keeps no state that
matters across restarts: a restarted monitor observes a whole stable window before it scales in.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable

from sqlalchemy import delete, select, update

from cloudml_os import quotas
from cloudml_os.config import MachineType, Settings
from cloudml_os.serving.autoscaler import MEASURED, Decision, Policy, Scaler
from cloudml_os.store import Store
from cloudml_os.store.models import Model, Operation, Replica, Version, VersionEvent

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between two looks


class Autoscaling:
    """Every autoscaled version's :class:`Scaler`, fed from the monitor's readings.

    :param rates: ``rates()`` → replica id → metric → that replica's recent load (the monitor's).
    :param start_operation: enqueue the serving workflow's run of an operation (by id).
    """

    def __init__(self, store: Store, settings: Settings, rates: Callable[[], dict[Hashable, dict[str, float]]],
                 start_operation: Callable[[int], None], clock: Callable[[], float] = time.monotonic):
        self.store, self.settings, self._rates = store, settings, rates
        self._start_operation, self._clock = start_operation, clock
        self._scalers: dict[int, Scaler] = {}
        self._capped: dict[int, int] = {}  # version → the count its last QUOTA event stopped at

    def run(self, stop: Callable[[], bool]) -> None:
        """Tick every :data:`TICK` seconds until ``stop()``; a failed tick is logged and the next one runs."""
        while not stop():
            started = self._clock()
            try:
                self.tick()
            except Exception:
                log.exception("autoscaling tick failed")
            time.sleep(max(0.0, TICK - (self._clock() - started)))

    def tick(self) -> list[tuple[int, Decision]]:
        """One look at every autoscaled version; returns the decisions carried out."""
        now = self._clock()
        with self.store.session() as session:
            versions = [row for row in session.execute(
                select(Version.id, Version.state, Version.replicas, Version.auto_scaling)
                .where(Version.state.in_(("READY", "UPDATING")))).all() if row.auto_scaling]
            ready: dict[int, list[int]] = defaultdict(list)
            for replica_id, version_id in session.execute(select(Replica.id, Replica.version_id).where(
                    Replica.state == "READY", Replica.healthy.is_(True),
                    Replica.version_id.in_([row.id for row in versions]))):
                ready[version_id].append(replica_id)
        loads = self._rates()
        done = []
        for row in versions:
            policy = Policy.from_config(row.auto_scaling)
            scaler = self._scalers.get(row.id)
            if scaler is None or scaler.policy != policy:
                scaler = self._scalers[row.id] = Scaler(policy)
            reporting = [loads[replica] for replica in ready[row.id] if replica in loads]
            totals = {metric: sum(load.get(metric, 0.0) for load in reporting) for metric in MEASURED}
            decision = scaler.observe(now, row.replicas, len(ready[row.id]), totals)
            if decision is not None and row.state == "READY" and self.scale(row.id, decision):
                done.append((row.id, decision))
        for version_id in self._scalers.keys() - {row.id for row in versions}:
            del self._scalers[version_id]
        return done

    def scale(self, version_id: int, decision: Decision) -> bool:
        return scale_version(self.store, self.settings, version_id, decision.replicas, decision.reason,
                             self._start_operation, self._capped)


def scale_version(store: Store, settings: Settings, version_id: int, want: int, reason: str,
                  start_operation: Callable[[int], None], capped: dict[int, int] | None = None) -> bool:
    """Have a READY autoscaled version scale to ``want`` replicas (an operation, and an ``AUTOSCALE`` event
    "N → M replicas: ``reason``"); False when it changed meanwhile or its quota leaves no room. A scale-out stops at
    the project's quota with a ``QUOTA`` event (once per count it stops at, kept in ``capped``)."""
    capped = {} if capped is None else capped
    with store.session() as session:
        row = session.get(Version, version_id)
        if row is None or row.state != "READY" or not row.auto_scaling or row.replicas == want:
            return False
        model = session.get(Model, row.model_id)
        if want > row.replicas:
            machine_type = settings.machine_types.get(row.machine_type, MachineType(row.machine_type, "", 0))
            room = quotas.room(session, settings, model.project, quotas.version_demand(1, machine_type))
            if room is not None and row.replicas + room < want:
                allowed = row.replicas + room
                if capped.get(version_id) != allowed:
                    capped[version_id] = allowed
                    session.add(VersionEvent(version_id=version_id, kind="QUOTA", message=(
                        f"autoscaling wants {want} replicas; the project's quota allows {allowed}")))
                if allowed <= row.replicas:
                    return False
                want, reason = allowed, f"{reason} (wanted {want}; the project's quota allows {allowed})"
        else:
            capped.pop(version_id, None)
        moved = session.execute(update(Version).where(Version.id == version_id, Version.state == "READY")
                                .values(state="UPDATING", replicas=want, etag=Version.etag + 1)
                                .execution_options(synchronize_session=False)).rowcount
        if not moved:
            return False
        target = f"projects/{model.project}/models/{model.name}/versions/{row.name}"
        operation = Operation.new(model.project, "UPDATE_VERSION", target, version_id)
        reason = f"{row.replicas} → {want} replicas: {reason}"
        event = VersionEvent(version_id=version_id, kind="AUTOSCALE", message=reason)
        session.add_all([operation, event])
    previous = row.replicas
    try:
        start_operation(operation.id)
    except Exception:
        log.exception("could not start the autoscaling operation of version %s", version_id)
        with store.session() as session:
            session.execute(delete(VersionEvent).where(VersionEvent.id == event.id))
            session.execute(delete(Operation).where(Operation.id == operation.id))
            session.execute(update(Version).where(Version.id == version_id, Version.state == "UPDATING")
                            .values(state="READY", replicas=previous, etag=Version.etag + 1))
        return False
    log.info("version %s: %s", version_id, reason)
    return True
