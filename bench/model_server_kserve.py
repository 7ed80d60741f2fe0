"""Our model server against a model server built on the KServe Python SDK, serving the same TensorFlow SavedModel.

- ours: ``cloudml_os/serving/runtime/model_server.py`` (``http.server``, a thread per connection), run with the
  TensorFlow 2.21 node runtime's python, as a replica runs it;
- kserve: a ``kserve.Model`` subclass (written to a temporary directory: the same ``tf.saved_model.load`` and
  ``serving_default`` call, ``predict`` answering ``{"predictions": [...]}`` to a v1 request and an
  ``InferResponse`` to a v2 one) started by ``kserve.ModelServer().start([model])``: FastAPI on uvicorn (uvloop,
  httptools), one worker, gRPC off. Its per-request log lines (uvicorn's access log and KServe's latency line)
  are off, ours having none; ``--kserve-request-logs`` keeps them.

The model is y = 3x + 2, a Keras ``Dense(1)`` exported as a SavedModel at the start. Both servers must give the
same predictions (for both bodies) before anything is measured; the v2 ``/v2/models/NAME/infer`` with a JSON body
is tried on both and reported.

For each client concurrency (threads, each with its own ``requests.Session``, keep-alive, sending back to back)
and each body (TF Serving ``:predict`` with 2 instances, and with ``--big`` instances), the two servers alternate
for ``--rounds`` rounds of ``--seconds`` each, in an order that flips every round, after a warm-up. Reported per
server: requests/s (median of the rounds, and their range), p50 and p99 latency over all its requests, the
server process's CPU time per request (``/proc/PID/stat`` utime + stime, with any child processes, before and
after each round) and the client's (``time.process_time``, median of the rounds); then kserve / ours, each the
median (and range) over the rounds of the ratio within a round, which cancels most of the load that other work
puts on the machine. The client runs on the same cores as the servers.

KServe's SDK pins protobuf < 7 (0.17-0.21; 0.15 and 0.16 pin < 5 and < 6, which TensorFlow 2.21's >= 6.31.1
excludes), so it cannot go into the TensorFlow runtime (protobuf 7): the first run builds a venv of its own,
``~/.cache/cloudml-os/kserve-bench/kserve-VERSION-RUNTIME``, with the runtime's python and the runtime's package
versions (``pip freeze`` as constraints) but protobuf, plus ``kserve==KSERVE_VERSION``; the runtime is untouched.

    .venv/bin/python -m bench.model_server_kserve [--threads 1 8] [--rounds 10] [--seconds 2] [--big 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from cloudml_os.config import load_settings
from cloudml_os.runtimes import ensure_runtime

ROOT = Path(__file__).resolve().parents[1]
OUR_SERVER = ROOT / "cloudml_os" / "serving" / "runtime" / "model_server.py"
TF_RUNTIME = "tensorflow-2.21"
KSERVE_VERSION = "0.21.0"
BENCH_HOME = Path.home() / ".cache" / "cloudml-os" / "kserve-bench"
NOT_COPIED = {"pip", "setuptools", "wheel", "protobuf"}  # protobuf: KServe wants < 7, the runtime has 7
MODEL = "bench"
SIDES = ("ours", "kserve")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

MAKE_MODEL = """
import sys
import numpy as np
import tensorflow as tf
model = tf.keras.Sequential([tf.keras.Input(shape=(1,)), tf.keras.layers.Dense(1)])
model.layers[0].set_weights([np.array([[3.0]], np.float32), np.array([2.0], np.float32)])
model.export(sys.argv[1], verbose=False)
"""

KSERVE_SERVER = '''"""A KServe model server for a TensorFlow SavedModel (from bench/model_server_kserve.py)."""

import argparse
import logging
import os
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np
import tensorflow as tf
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.utils.numpy_codec import from_np_dtype


class TensorFlowModel(Model):
    """A SavedModel's serving_default signature, with one input and one output."""

    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        self.model_dir = model_dir
        self.load()

    def load(self) -> bool:
        self._loaded = tf.saved_model.load(self.model_dir)
        self._signature = self._loaded.signatures["serving_default"]
        ((self._input, spec),) = self._signature.structured_input_signature[1].items()
        self._dtype = spec.dtype.as_numpy_dtype
        (self._output,) = self._signature.structured_outputs
        self.ready = True
        return self.ready

    def _run(self, array: np.ndarray) -> np.ndarray:
        inputs = {self._input: tf.constant(array.astype(self._dtype, copy=False))}
        return self._signature(**inputs)[self._output].numpy()

    def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):  # v2
            result = self._run(payload.inputs[0].as_numpy())
            output = InferOutput(name=self._output, shape=list(result.shape), datatype=from_np_dtype(result.dtype))
            output.set_data_from_numpy(result, binary_data=False)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                 infer_outputs=[output])
        return {"predictions": self._run(np.asarray(payload["instances"])).tolist()}  # v1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--request_logs", action="store_true")
    args, _ = parser.parse_known_args()
    model = TensorFlowModel(args.model_name, args.model_dir)
    server = ModelServer()  # its settings come from the command line: --http_port, --workers, --enable_grpc...
    if not args.request_logs:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([model])
'''


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kserve_venv(runtime: Path) -> tuple[Path, float | None]:
    """The venv with KServe (built once, under a lock) and the seconds its build took (None: it was there)."""
    target = BENCH_HOME / f"kserve-{KSERVE_VERSION}-{runtime.name}"
    marker = target / ".complete"
    if marker.exists():
        return target, None
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    with open(BENCH_HOME / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target, None
        if target.exists():
            shutil.rmtree(target)
        started = time.monotonic()
        _progress(f"building {target} (once; a minute or two)")
        python = str(runtime / "bin" / "python")
        freeze = subprocess.run([python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        pins = [line for line in freeze if "==" in line and line.split("==")[0].lower() not in NOT_COPIED]
        tensorflow = next(line for line in pins if line.lower().startswith(("tensorflow==", "tensorflow-cpu==",
                                                                            "tensorflow_cpu==")))
        subprocess.run([python, "-m", "venv", str(target)], check=True)  # on the runtime's base interpreter
        constraints = target / "runtime-constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                        "--progress-bar", "off", "--quiet", "-c", str(constraints), tensorflow,
                        f"kserve=={KSERVE_VERSION}"], check=True)
        subprocess.run([str(target / "bin" / "python"), "-m", "pip", "check", "--disable-pip-version-check"],
                       check=True, stdout=subprocess.DEVNULL)
        elapsed = time.monotonic() - started
        marker.write_text(f"built {time.strftime('%Y-%m-%dT%H:%M:%S%z')} in {elapsed:.0f} s from {runtime}\n")
    return target, elapsed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _server(name: str, command: list[str], log: Path, ready_url: str) -> Iterator[subprocess.Popen]:
    """A server process, once ``ready_url`` answers 200; stopped (SIGTERM, then SIGKILL) at the end."""
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after 180 s:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(ready_url, timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) and of its descendants."""
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent, CPU seconds)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    tree, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for child, (parent, _) in stats.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    for member in tree:
        total += stats.get(member, (0, 0.0))[1]
    return total


def run_load(url: str, body: bytes, threads: int, seconds: float,
             pid: int) -> tuple[list[float], float, float, float]:
    """``threads`` clients posting ``body`` back to back for ``seconds``: every latency (s), requests per second,
    the server's CPU seconds per request and this (the client's) process's."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures: list[str] = []
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]
    sessions = [requests.Session() for _ in range(threads)]
    headers = {"Content-Type": "application/json"}

    def worker(session: requests.Session, mine: list[float]) -> None:
        start.wait()
        clock = time.perf_counter
        while (began := clock()) < stop_at[0]:
            answer = session.post(url, data=body, headers=headers, timeout=60)
            if answer.status_code != 200:
                failures.append(f"{answer.status_code} {answer.text[:200]}")
                return
            mine.append(clock() - began)

    workers = [threading.Thread(target=worker, args=pair) for pair in zip(sessions, latencies, strict=True)]
    for thread in workers:
        thread.start()
    cpu_before = cpu_seconds(pid)
    stop_at[0] = time.perf_counter() + seconds
    began, client_began = time.perf_counter(), time.process_time()
    start.wait()
    for thread in workers:
        thread.join()
    elapsed, client = time.perf_counter() - began, time.process_time() - client_began
    cpu = cpu_seconds(pid) - cpu_before
    for session in sessions:
        session.close()
    if failures:
        raise RuntimeError(f"{url}: {failures[0]}")
    every = [latency for mine in latencies for latency in mine]
    count = max(1, len(every))
    return every, len(every) / elapsed, cpu / count, client / count


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def spread(values: list[float], digits: int = 0) -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def check_answers(bases: dict[str, str], bodies: dict[str, bytes], input_name: str) -> None:
    """Both servers give the same v1 predictions for every body; the v2 infer of both is tried and reported."""
    for label, body in bodies.items():
        answers = {}
        for side, base in bases.items():
            answer = requests.post(f"{base}/v1/models/{MODEL}:predict", data=body, timeout=60)
            assert answer.status_code == 200, (side, answer.status_code, answer.text[:500])
            answers[side] = answer.json()["predictions"]
        instances = json.loads(body)["instances"]
        expected = [[3.0 * row[0] + 2.0] for row in instances]
        assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(answers["ours"], expected, strict=True)), answers["ours"]
        same = answers["ours"] == answers["kserve"]
        assert same, f"v1 predictions differ for {label}: {answers['ours'][:4]} vs {answers['kserve'][:4]}"
        print(f"v1 :predict, {label}: both answer the same {len(answers['ours'])} predictions "
              f"(first {answers['ours'][:2]})")
    request = {"inputs": [{"name": input_name, "shape": [2, 1], "datatype": "FP32", "data": [0.0, 1.0]}]}
    outputs = {}
    for side, base in bases.items():
        answer = requests.post(f"{base}/v2/models/{MODEL}/infer", json=request, timeout=60)
        print(f"v2 infer (JSON) on {side}: {answer.status_code} {answer.text[:300]}")
        if answer.status_code == 200:
            outputs[side] = [(output["shape"], output["data"]) for output in answer.json()["outputs"]]
    if len(outputs) == 2:
        print(f"v2 infer: {'same outputs on both' if outputs['ours'] == outputs['kserve'] else 'outputs DIFFER'}")


def compare(urls: dict[str, str], pids: dict[str, int], label: str, body: bytes, threads: int, rounds: int,
            seconds: float) -> None:
    """Both servers, alternating, at one concurrency and body; prints their figures and kserve / ours."""
    for side in SIDES:  # warm-up: connections opened, code paths hot
        run_load(urls[side], body, threads, min(1.0, seconds), pids[side])
    latencies: dict[str, list[float]] = {side: [] for side in SIDES}
    figures: dict[str, list[tuple[float, ...]]] = {side: [] for side in SIDES}  # rate, p50, p99, cpu, client cpu
    for round_number in range(rounds):
        for side in SIDES if round_number % 2 == 0 else reversed(SIDES):
            every, rate, cpu, client = run_load(urls[side], body, threads, seconds, pids[side])
            latencies[side] += every
            figures[side].append((rate, percentile(every, 0.5), percentile(every, 0.99), cpu, client))
    for side in SIDES:
        rates = [figure[0] for figure in figures[side]]
        cpus = [figure[3] * 1e3 for figure in figures[side]]
        client = statistics.median(figure[4] for figure in figures[side]) * 1e3
        print(f"{threads:>7} {label:>10} {side:>6} {spread(rates):>20} {percentile(latencies[side], 0.5) * 1e3:8.2f} "
              f"{percentile(latencies[side], 0.99) * 1e3:8.2f} {spread(cpus, 2):>20} {client:10.2f}")
    pairs = list(zip(figures["ours"], figures["kserve"], strict=True))
    ratios = [[theirs[index] / ours[index] for ours, theirs in pairs] for index in range(4)]
    print(f"{threads:>7} {label:>10} kserve/ours: req/s ×{spread(ratios[0], 2)}, p50 ×{spread(ratios[1], 2)}, "
          f"p99 ×{spread(ratios[2], 2)}, CPU/req ×{spread(ratios[3], 2)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--big", type=int, default=1000, help="instances in the big body")
    parser.add_argument("--kserve-request-logs", action="store_true",
                        help="keep KServe's per-request log lines (uvicorn access log, latency line)")
    parser.add_argument("--setup-only", action="store_true", help="build the KServe venv and stop")
    args = parser.parse_args()

    runtime = ensure_runtime(TF_RUNTIME, load_settings(environ={}).runtimes_dir)
    venv, built_in = kserve_venv(runtime)
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
                              "print(m.version('kserve'), m.version('tensorflow-cpu'), m.version('numpy'), "
                              "m.version('protobuf'), m.version('uvicorn'), m.version('fastapi'))"],
                             capture_output=True, text=True, check=True).stdout.split()
    built = "cached" if built_in is None else f"built in {built_in:.0f} s"
    print(f"KServe venv {venv} ({built}): "
          f"kserve {version[0]}, tensorflow-cpu {version[1]}, numpy {version[2]}, protobuf {version[3]}, "
          f"uvicorn {version[4]}, fastapi {version[5]}")
    if args.setup_only:
        return

    bodies = {"2 inst": json.dumps({"instances": [[0.0], [1.0]]}).encode(),
              f"{args.big} inst": json.dumps({"instances": [[i / 10] for i in range(args.big)]}).encode()}
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory(prefix="kserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "model"
        subprocess.run([str(runtime / "bin" / "python"), "-c", MAKE_MODEL, str(model_dir)], check=True,
                       env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (tmp / "kserve_server.py").write_text(KSERVE_SERVER)
        ports = {side: _free_port() for side in SIDES}
        bases = {side: f"http://127.0.0.1:{ports[side]}" for side in SIDES}
        commands = {
            "ours": [str(runtime / "bin" / "python"), str(OUR_SERVER), "--framework", "TENSORFLOW",
                     "--model-dir", str(model_dir), "--model-name", MODEL, "--host", "127.0.0.1",
                     "--port", str(ports["ours"])],
            "kserve": [str(venv / "bin" / "python"), str(tmp / "kserve_server.py"), "--model_dir", str(model_dir),
                       "--model_name", MODEL, "--http_port", str(ports["kserve"]), "--workers", "1",
                       "--enable_grpc", "false",
                       *(["--request_logs"] if args.kserve_request_logs else ["--enable_latency_logging", "false"])],
        }
        with contextlib.ExitStack() as stack:
            pids = {}
            for side in SIDES:
                started = time.monotonic()
                process = stack.enter_context(_server(side, commands[side], tmp / f"{side}.log",
                                                      f"{bases[side]}/v2/health/ready"))
                pids[side] = process.pid
                print(f"{side}: pid {process.pid}, {bases[side]}, ready {time.monotonic() - started:.1f} s after "
                      f"its start")
            metadata = requests.get(f"{bases['ours']}/v2/models/{MODEL}", timeout=10).json()
            check_answers(bases, bodies, metadata["inputs"][0]["name"])

            print(f"\n{args.rounds} rounds × {args.seconds:g} s per server, order flipped each round; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start; bodies "
                  + ", ".join(f"{label} = {len(body)} B" for label, body in bodies.items()))
            print(f"{'threads':>7} {'body':>10} {'server':>6} {'req/s (range)':>20} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'CPU ms/req (range)':>20} {'client CPU':>10}")
            for threads in args.threads:
                for label, body in bodies.items():
                    urls = {side: f"{bases[side]}/v1/models/{MODEL}:predict" for side in SIDES}
                    compare(urls, pids, label, body, threads, args.rounds, args.seconds)
            print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
