"""The autoscaler's algorithm (Knative's stable and panic windows, HPA's tolerance and scale-in stabilisation),
fed simulated load one tick a second."""

import os
import random
import sys
import time
from pathlib import Path

import pytest

from cloudml_os.serving.autoscaler import CPU_USAGE, GPU_DUTY_CYCLE, REQUESTS_IN_FLIGHT, Load, Policy, Scaler, rates


def policy(**fields) -> Policy:
    values = {"min_nodes": 1, "max_nodes": 10, "targets": ((REQUESTS_IN_FLIGHT, 1.0),), "stable_window": 60.0,
              "panic_window": 6.0, **fields}
    return Policy(**values)


def simulate(scaler: Scaler, load, seconds: int, current: int, start: int = 0) -> tuple[int, list]:
    """Tick once a second for ``seconds``; ``load(t)`` is the version's total requests in flight. Decisions
    take effect at once (every replica ready). Returns the final count and [(t, count)] of each change."""
    changes = []
    for t in range(start, start + seconds):
        decision = scaler.observe(float(t), current, current, {REQUESTS_IN_FLIGHT: load(t), CPU_USAGE: 0.0})
        if decision is not None:
            current = decision.replicas
            changes.append((t, current))
    return current, changes


def test_load_round_trips_through_its_header_and_gives_rates():
    before = Load(time=10.0, busy=3.0, cpu=1.0, cpus=2, in_flight=1)
    assert Load.parse(before.header()) == before
    after = Load(time=12.0, busy=7.0, cpu=2.0, cpus=2)
    assert rates(before, after) == {REQUESTS_IN_FLIGHT: 2.0, CPU_USAGE: 25.0}
    assert rates(after, before) is None  # a restarted server's counters began again
    for bad in ("", "time=1", "time=x; busy=1; cpu=1; cpus=2", "time=1; busy=1; cpu=1; cpus=0", "time=nan; busy=1; "
                "cpu=1; cpus=2"):
        assert Load.parse(bad) is None


def test_a_load_step_scales_out_within_one_panic_window():
    scaler = Scaler(policy())
    current, changes = simulate(scaler, lambda t: 1.0, 120, current=1)
    assert changes == [] and current == 1
    current, changes = simulate(scaler, lambda t: 8.0, 30, current=1, start=120)
    assert changes and changes[0][0] - 120 <= 6, changes  # panic: decided within the panic window
    assert current == 8
    assert all(later >= earlier for (_, earlier), (_, later) in zip(changes, changes[1:], strict=False))


def test_steady_noisy_load_near_the_target_changes_nothing_for_five_minutes():
    noise = random.Random(7)
    scaler = Scaler(policy())
    current, changes = simulate(scaler, lambda t: 4.0 * noise.uniform(0.92, 1.08), 300, current=4)
    assert (current, changes) == (4, [])


def test_scale_in_waits_for_the_stable_window_and_takes_its_highest_want():
    scaler = Scaler(policy())
    simulate(scaler, lambda t: 4.0, 120, current=4)
    current, changes = simulate(scaler, lambda t: 0.0, 120, current=4, start=120)
    assert changes and changes[0][0] - 120 >= 59, changes
    assert current == 1  # minNodes
    assert changes[-1][0] - changes[0][0] <= 6, changes  # down within one panic window, no slow staircase


def test_panic_never_scales_in_and_ends_after_a_calm_stable_window():
    scaler = Scaler(policy())
    simulate(scaler, lambda t: 1.0, 60, current=1)
    current, _ = simulate(scaler, lambda t: 6.0, 10, current=1, start=60)
    assert current == 6
    current, changes = simulate(scaler, lambda t: 1.0, 20, current=current, start=70)
    assert (current, changes) == (6, [])  # panicking: the burst may come back
    current, changes = simulate(scaler, lambda t: 1.0, 120, current=current, start=90)
    assert current == 1 and changes[0][0] >= 70 + 60


@pytest.mark.parametrize("bounds, load, expected", [({"max_nodes": 3}, 50.0, 3), ({"min_nodes": 2}, 0.0, 2),
                                                     ({"min_nodes": 0}, 0.0, 0)])
def test_the_count_stays_within_min_and_max_nodes(bounds, load, expected):
    scaler = Scaler(policy(**bounds))
    current, changes = simulate(scaler, lambda t: load, 200, current=1)
    assert current == expected
    assert all(policy(**bounds).min_nodes <= count <= policy(**bounds).max_nodes for _, count in changes)


def test_cpu_usage_is_a_percent_of_the_replicas_cores_and_the_larger_want_wins():
    scaler = Scaler(policy(targets=((REQUESTS_IN_FLIGHT, 4.0), (CPU_USAGE, 50.0)), stable_window=10.0,
                           panic_window=2.0))
    for t in range(30):  # 1 request in flight (wants 1), but 150 % CPU over 1 replica (wants 3)
        decision = scaler.observe(float(t), 1, 1, {REQUESTS_IN_FLIGHT: 1.0, CPU_USAGE: 150.0})
        if decision:
            assert decision.replicas == 3 and CPU_USAGE in decision.reason
            return
    pytest.fail("no decision")


def test_a_count_changed_elsewhere_is_observed_a_whole_window_before_scaling_in():
    scaler = Scaler(policy(min_nodes=0, stable_window=10.0, panic_window=2.0))
    simulate(scaler, lambda t: 0.0, 30, current=0)
    current, changes = simulate(scaler, lambda t: 0.0, 30, current=1, start=30)  # woken by a request
    assert current == 0 and changes[0][0] >= 30 + 10


def test_the_model_servers_gpu_meter_integrates_nvidia_smis_duty_cycle(tmp_path, monkeypatch):
    """What cannot run here (a GPU) is a fake nvidia-smi printing what the real one prints for
    --query-gpu=utilization.gpu --format=csv,noheader,nounits: one percent per GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cloudml_os" / "serving" / "runtime"))
    import model_server

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nprintf "40\\n80\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert model_server.GpuDutyMeter.for_this_node() is None  # a node without GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert model_server.GpuDutyMeter.for_this_node() is not None
    meter = model_server.GpuDutyMeter(str(fake), "0,1", interval=0.05)
    meter.start()
    time.sleep(0.3)  # past the first sample: from then on the duty cycle is 60 %
    first = Load(time.monotonic(), 0.0, 0.0, 1, gpu=meter.read())
    time.sleep(0.5)
    second = Load(time.monotonic(), 0.0, 0.0, 1, gpu=meter.read())
    assert rates(first, second)[GPU_DUTY_CYCLE] == pytest.approx(60.0, abs=3.0)
    assert "--query-gpu=utilization.gpu --format=csv,noheader,nounits --id=0,1" in (tmp_path / "calls").read_text()
    server = model_server.ModelServer("TENSORFLOW", "m", str(tmp_path), meter)
    assert Load.parse(server.load_header()).gpu > 0
    assert Load.parse(model_server.ModelServer("TENSORFLOW", "m", str(tmp_path)).load_header()).gpu is None
