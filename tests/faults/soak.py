"""Fault-injection soak of the whole pipeline on the local broker (SPEC section 13).

Starts the local broker (``dmrstream broker --port P``), the streamer, the trainer and a scorer as
real subprocesses (real RocksDB, real model store), feeds them a simulated stream whose event time
follows wall time plus score requests, and at seeded random moments SIGKILLs the streamer, the
trainer and the scorer (each restarted after a short seeded pause) and restarts the broker (its
process group SIGKILLed, a new one started on the same port). After each fault it measures the
time to recover: from the restart until the component's next progress (streamer: samples
produced; trainer: samples learned; scorer: requests answered; broker: all three). At the end it
stops producing, lets the pipeline drain, SIGTERMs everything (each must exit 0) and checks the
outcome against plain reference code over the driver's own event log:

- every impression whose attribution window closed has exactly one sample id (repeats on the
  topic must carry identical labels), and no sample is invented;
- the feature store equals the reference sequences of the event log (events up to the merge
  watermark of their partition);
- the trainer learned every sample exactly once (its durable learned-ids log);
- every score request was answered, and only requests we sent;
- no component died by itself or stayed stuck.

What a broker restart means here: the local tansu broker has memory storage only (its binary
offers ``memory://``, ``s3://`` which needs an S3 service, and ``postgres://`` which this build
lacks: ``FeatureNotEnabled``), so a restarted broker is a new, empty cluster at the same address:
the topics are re-created by ``dmrstream broker``, and every message and committed group offset of
the old one is gone. Real Kafka keeps them. To keep the exact checks meaningful the driver
therefore pauses its producer and waits until the pipeline has drained (streamer offsets
committed up to what was produced, every sample learned and checkpointed, every request answered)
before the kill; what a broker restart tests here is that every component notices the broker
going away, reconnects by itself with back-off and carries on with the new cluster. Messages in
flight inside a memory broker at a crash cannot survive it, with or without this project.

Run: ``python tests/faults/soak.py --duration 600 --seed 1`` (the figures are printed as JSON and
kept in ``$TMPDIR/dmrstream-soak-last.json`` for ``tests/faults/reliability.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "tests"):  # the project, and the tests' plain reference code
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from kafka import TopicPartition  # noqa: E402

from dmrstream.contracts import Candidate, Click, Codec, Impression, Sample, Score, ScoreRequest, encode  # noqa: E402
from dmrstream.kafkaio import make_admin, make_consumer, make_producer  # noqa: E402
from dmrstream.settings import Settings, load_settings  # noqa: E402
from pipeline_reference import partition_of, reference_sequences, store_mismatches, watermarks  # noqa: E402

LAST_FIGURES = Path(tempfile.gettempdir()) / "dmrstream-soak-last.json"
KINDS = ("streamer", "trainer", "scorer", "broker")
PARTITIONS = 2
WINDOW_MS = 10_000
EVENTS_PER_SESSION = 18.0  # the simulator's mean (see monitoring/demo.py)

# Small model and short schedules (like the demo's DEMO_SETS / the monitoring test's SMALL), so the
# whole pipeline fits on 2 shared cores; checkpoints often, so a drained trainer is durable soon.
SETS = {
    "topics.prefix": "soak.",
    "topics.partitions": PARTITIONS,
    "kafka.session_timeout_ms": 6000,
    "join.attribution_window_ms": WINDOW_MS,
    "model.item_vocab_size": 4096,
    "model.user_vocab_size": 4096,
    "model.category_vocab_size": 256,
    "model.field_vocab_size": 4096,
    "model.aux_negatives": 32,
    "model.batch_size": 32,
    "model.mlp_hidden": [64, 32],
    "trainer.delta_every_s": 3.0,
    "trainer.full_every_s": 15.0,
    "trainer.checkpoint_every_s": 2.0,
    "trainer.max_wait_ms": 500,
    "scorer.rollback_min_samples": 1_000_000,  # no automatic rollback: not what this suite tests
}

# What "progress" means per component: a Prometheus counter of the process, and label filters.
PROGRESS = {
    "streamer": ("dmrstream_events_out_total", ('component="streamer"', 'samples"')),
    "trainer": ("dmrstream_trainer_samples_total", ()),
    "scorer": ("dmrstream_scorer_responses_total", ('outcome="ok"',)),
}


@dataclass
class SoakConfig:
    duration_s: float = 100.0  # stream time after warm-up (the faults happen inside it)
    seed: int = 1
    faults_per_kind: int = 2
    events_per_s: float = 60.0
    requests_per_s: float = 2.0
    users: int = 300
    items: int = 1_000
    workdir: Optional[Path] = None
    warmup_timeout_s: float = 180.0
    recovery_timeout_s: float = 120.0
    drain_timeout_s: float = 120.0
    min_gap_s: float = 2.0  # seeded pause after a recovery before the next fault: [min, max]
    max_gap_s: float = 6.0
    verbose: bool = True


def _fmt_set(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def scrape(port: int, name: str, labels: tuple[str, ...] = ()) -> Optional[float]:
    """Sum of a metric's samples whose label text contains every filter; None when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except Exception:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            head, _, value = line.rpartition(" ")
            if all(f in head for f in labels):
                total += float(value)
    return total


def pctl(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 2)


# -- processes ------------------------------------------------------------------------------------
class Proc:
    """One component: ``python -m dmrstream <global options> <role...>`` in its own session."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict):
        self.name, self.args, self.log, self.env = name, args, log, env
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.expected_exit = False

    def start(self) -> "Proc":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            f.write(f"\n=== start {self.starts + 1} at {time.strftime('%H:%M:%S')} ===\n".encode())
            f.flush()
            self.proc = subprocess.Popen(self.args, stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        self.expected_exit = False
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        """SIGKILL this component's own process group (the broker's includes its tansu child)."""
        if self.proc is None:
            return
        self.expected_exit = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def terminate(self, timeout_s: float = 60.0) -> Optional[int]:
        """SIGTERM, wait; returns the exit code (None: it had to be SIGKILLed)."""
        if self.proc is None:
            return None
        self.expected_exit = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        try:  # stragglers of its own group (none expected)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if rc is None:
            self.proc.wait()
        return rc


# -- the stream -----------------------------------------------------------------------------------
class StreamProducer(threading.Thread):
    """Simulated impressions/clicks (event time follows wall time) and score requests. Every event
    is written to the event log before it is sent, every request id to the request log. ``pause``
    stops sending and flushes; after a pause the stream catches up (event time keeps its plan)."""

    def __init__(self, settings: Settings, cfg: SoakConfig, workdir: Path):
        super().__init__(daemon=True, name="soak-producer")
        from replay.simulate import SimConfig, simulate

        self.settings, self.cfg = settings, cfg
        self.start_ms = int(time.time() * 1000) + 2_000
        sim = SimConfig(users=cfg.users, items=cfg.items, seed=cfg.seed,
                        sessions_per_s=cfg.events_per_s / EVENTS_PER_SESSION, start_ms=self.start_ms)
        self.events = simulate(sim)  # endless, in event-time order
        self.rng = random.Random(cfg.seed * 7919 + 1)
        self.event_log = open(workdir / "events.log", "wb")
        self.request_log = open(workdir / "requests.log", "w")
        self.stop = threading.Event()
        self._pause = threading.Event()
        self.paused = threading.Event()
        self.acked: dict[tuple[str, int], int] = {}  # (topic, partition) -> end offset in this epoch
        self.failures: list[str] = []
        self.sent_events = self.sent_requests = self.resends = 0
        self.error: Optional[BaseException] = None
        self._futures: list = []
        self._lock = threading.Lock()

    def pause(self, timeout_s: float = 60.0) -> bool:
        self._pause.set()
        return self.paused.wait(timeout_s)

    def resume(self, new_epoch: bool = False) -> None:
        if new_epoch:
            with self._lock:
                self.acked.clear()
        self.paused.clear()
        self._pause.clear()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # surfaced by the driver
            self.error = e
            self.paused.set()

    def _settle(self, producer, wait: bool) -> None:
        """Check acknowledged sends; a failed one (e.g. the batch in flight when the broker
        restarts) is sent again: the log has it once."""
        while True:
            keep, failed = [], []
            for topic, fut, what, key, value in self._futures:
                if not wait and not fut.is_done:
                    keep.append((topic, fut, what, key, value))
                    continue
                try:
                    md = fut.get(timeout=180)
                    with self._lock:
                        tp = (topic, md.partition)
                        self.acked[tp] = max(self.acked.get(tp, 0), md.offset + 1)
                except Exception as e:
                    failed.append((topic, what, key, value, e))
            self._futures = keep
            if not failed:
                return
            self.resends += len(failed)
            if self.resends > 100_000:
                self.failures += [f"{what}: {type(e).__name__}: {e}" for _, what, _, _, e in failed]
                return
            time.sleep(0.5)
            for topic, what, key, value, _ in failed:
                self._futures.append((topic, producer.send(topic, key=key, value=value), what, key, value))
            if not wait:
                return
            producer.flush()

    def _run(self) -> None:
        t = self.settings.topics
        producer = make_producer(self.settings)
        nxt = next(self.events)
        next_request = time.monotonic()
        n_req = 0
        try:
            while not self.stop.is_set():
                if self._pause.is_set():
                    producer.flush()
                    self._settle(producer, wait=True)
                    self.event_log.flush()
                    self.request_log.flush()
                    self.paused.set()
                    while self._pause.is_set() and not self.stop.is_set():
                        time.sleep(0.05)
                    continue
                now_ms = time.time() * 1000
                sent = 0
                while nxt.ts <= now_ms and sent < 2_000:
                    kind = "impressions" if isinstance(nxt, Impression) else "clicks"
                    value = encode(nxt)
                    self.event_log.write(kind[0].encode() + b" " + value + b"\n")
                    key = str(nxt.user_id).encode()
                    fut = producer.send(t.name(kind), key=key, value=value)
                    self._futures.append((t.name(kind), fut, nxt.event_id, key, value))
                    self.sent_events += 1
                    sent += 1
                    nxt = next(self.events)
                if time.monotonic() >= next_request:
                    next_request += 1.0 / self.cfg.requests_per_s
                    n_req += 1
                    q = ScoreRequest(
                        request_id=f"q{self.cfg.seed}-{n_req}", user_id=self.rng.randrange(self.cfg.users),
                        ts=int(now_ms), candidates=[Candidate(item_id=self.rng.randrange(self.cfg.items),
                                                              category_id=self.rng.randrange(100))
                                                    for _ in range(3)])
                    self.request_log.write(q.request_id + "\n")
                    key, value = str(q.user_id).encode(), encode(q)
                    fut = producer.send(t.name("score_requests"), key=key, value=value)
                    self._futures.append((t.name("score_requests"), fut, q.request_id, key, value))
                    self.sent_requests += 1
                if len(self._futures) > 2_000:
                    self._settle(producer, wait=False)
                time.sleep(0.02)
            producer.flush()
            self._settle(producer, wait=True)
        finally:
            self.event_log.close()
            self.request_log.close()
            producer.close(timeout=10)


class Collector(threading.Thread):
    """Reads ``samples`` and ``scores`` from the beginning: labels by sample id (a repeat with
    another label is a conflict), answers by request id, and when each last grew."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="soak-collector")
        self.settings = settings
        self.labels: dict[str, int] = {}
        self.sample_msgs = 0
        self.conflicts: list[str] = []
        self.answers: dict[str, int] = {}
        self.answer_versions: set[int] = set()
        self.last_change = time.monotonic()
        self.stop = threading.Event()
        self._reset = threading.Event()
        self.reset_done = threading.Event()
        self.error: Optional[BaseException] = None

    def reset_to_beginning(self, timeout_s: float = 60.0) -> bool:
        """A new (empty) broker: read its topics from offset 0 (called while nothing is produced)."""
        self.reset_done.clear()
        self._reset.set()
        return self.reset_done.wait(timeout_s)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:
            self.error = e

    def _run(self) -> None:
        t = self.settings.topics
        c = make_consumer(self.settings, None, [])
        parts = [TopicPartition(t.name(n), p) for n in ("samples", "scores") for p in range(t.partitions)]
        c.assign(parts)
        c.seek_to_beginning()
        samples_topic = t.name("samples")
        sc, rc = Codec(Sample), Codec(Score)
        try:
            while not self.stop.is_set():
                if self._reset.is_set():
                    c.seek_to_beginning()
                    self._reset.clear()
                    self.reset_done.set()
                for tp, recs in c.poll(timeout_ms=200).items():
                    for r in recs:
                        if tp.topic == samples_topic:
                            s = sc.decode(r.value)
                            self.sample_msgs += 1
                            old = self.labels.setdefault(s.sample_id, s.label)
                            if old != s.label:
                                self.conflicts.append(s.sample_id)
                        else:
                            a = rc.decode(r.value)
                            self.answers[a.request_id] = self.answers.get(a.request_id, 0) + 1
                            self.answer_versions.add(a.model_version)
                        self.last_change = time.monotonic()
        finally:
            c.close()


# -- the driver -----------------------------------------------------------------------------------
class Soak:
    def __init__(self, cfg: SoakConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="dmrstream-soak-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ports = {"streamer": free_port(), "trainer": free_port(), "scorer": free_port()}
        sets = dict(SETS) | {
            "state_dir": str(self.workdir / "state"), "model_store": str(self.workdir / "models"),
            "metrics.streamer_port": self.ports["streamer"], "metrics.trainer_port": self.ports["trainer"],
            "metrics.scorer_port": self.ports["scorer"]}
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.settings = load_settings(overrides=sets | {"kafka.bootstrap_servers": self.bootstrap})
        base = [sys.executable, "-m", "dmrstream", "--log-level", "WARNING"]
        for k, v in sets.items():
            base += ["--set", _fmt_set(k, v)]
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        logs = self.workdir / "logs"
        self.procs = {
            "broker": Proc("broker", base + ["broker", "--port", str(self.port)], logs / "broker.log", env),
            "streamer": Proc("streamer", base + ["--bootstrap", self.bootstrap, "streamer"], logs / "streamer.log", env),
            "trainer": Proc("trainer", base + ["--bootstrap", self.bootstrap, "trainer", "--device", "cpu"],
                            logs / "trainer.log", env),
            "scorer": Proc("scorer", base + ["--bootstrap", self.bootstrap, "scorer"], logs / "scorer.log", env),
        }
        self.recovery: dict[str, list[float]] = {k: [] for k in KINDS}
        self.recovery_by_component: dict[str, list[float]] = {k: [] for k in PROGRESS}
        self.faults: dict[str, int] = {k: 0 for k in KINDS}
        self.not_recovered: list[str] = []
        self.unexpected_exits: list[str] = []
        self.drains: list[dict] = []
        self.timeline: list[dict] = []
        self._say = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.t0 = time.monotonic()
        self.producer: Optional[StreamProducer] = None
        self.collector: Optional[Collector] = None

    def say(self, msg: str) -> None:
        if self.cfg.verbose:
            self._say(f"[soak {time.monotonic() - self.t0:6.1f}s] {msg}")

    # -- helpers ----------------------------------------------------------------------------------
    def progress(self, name: str) -> Optional[float]:
        metric, labels = PROGRESS[name]
        return scrape(self.ports[name], metric, labels)

    def watch(self) -> None:
        """A component that exited without being told to is a failure: record it, restart it (so
        the run goes on and its checks still mean something)."""
        for name, p in self.procs.items():
            if p.proc is not None and not p.alive() and not p.expected_exit:
                rc = p.proc.returncode
                self.unexpected_exits.append(f"{name} exited by itself with code {rc}")
                self.say(f"!! {name} exited by itself (rc {rc}); restarting it")
                p.start()
                if name == "broker":
                    self.wait_broker()

    def wait_broker(self, timeout_s: float = 90.0) -> None:
        """Until the broker answers and every topic exists (``dmrstream broker`` creates them)."""
        from dmrstream.kafkaio import topic_specs

        want = set(topic_specs(self.settings))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                admin = make_admin(self.settings)
                try:
                    if want <= set(admin.list_topics()):
                        return
                finally:
                    admin.close()
            except Exception:
                pass
            if not self.procs["broker"].alive():
                raise RuntimeError(f"the broker exited (see {self.procs['broker'].log})")
            time.sleep(0.3)
        raise TimeoutError(f"broker not ready with its topics after {timeout_s}s")

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_threads()
            self.watch()
            time.sleep(min(0.25, max(0.0, end - time.monotonic())))

    def check_threads(self) -> None:
        for t in (self.producer, self.collector):
            if t is not None and t.error is not None:
                raise RuntimeError(f"{t.name} failed") from t.error

    def wait_progress(self, names: list[str], baselines: dict[str, float], since: float,
                      timeout_s: float) -> dict[str, Optional[float]]:
        """Seconds from ``since`` until each component's progress counter exceeds its baseline."""
        done: dict[str, Optional[float]] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(names) and time.monotonic() < deadline:
            for n in names:
                if n not in done:
                    v = self.progress(n)
                    if v is not None and v > baselines.get(n, 0.0):
                        done[n] = round(time.monotonic() - since, 2)
            self.sleep(0.25)
        for n in names:
            done.setdefault(n, None)
        return done

    # -- drain ------------------------------------------------------------------------------------
    def committed_streamer(self) -> Optional[dict[tuple[str, int], int]]:
        try:
            admin = make_admin(self.settings)
            try:
                t = self.settings.topics
                group = f"{t.prefix}streamer"
                off = admin.list_group_offsets({group: [TopicPartition(t.name(n), p) for n in ("impressions", "clicks")
                                                        for p in range(t.partitions)]})[group]
            finally:
                admin.close()
        except Exception:
            return None
        return {(tp.topic, tp.partition): m.offset for tp, m in off.items()}

    def drained(self) -> tuple[bool, str]:
        """The producer is paused and flushed; is everything it sent through the pipeline?"""
        from trainer.service import learned_ids

        t = self.settings.topics
        with self.producer._lock:
            acked = dict(self.producer.acked)
        committed = self.committed_streamer()
        if committed is None:
            return False, "streamer offsets unreadable"
        for (topic, p), end in acked.items():
            if topic in (t.name("impressions"), t.name("clicks")) and committed.get((topic, p), -1) < end:
                return False, f"streamer at {committed.get((topic, p))} < {end} on {topic}[{p}]"
        requests = self.sent_request_ids()
        unanswered = len(requests - set(self.collector.answers))
        if unanswered:
            return False, f"{unanswered} requests unanswered"
        if time.monotonic() - self.collector.last_change < 3.0:
            return False, "samples/scores still arriving"
        learned = set(learned_ids(self.settings.state_dir))
        missing = len(set(self.collector.labels) - learned)
        if missing:
            return False, f"{missing} samples not yet learned durably"
        return True, "drained"

    def drain(self, timeout_s: float) -> dict:
        started = time.monotonic()
        why = "producer did not pause"
        ok = self.producer.pause()
        while ok and time.monotonic() - started < timeout_s:
            done, why = self.drained()
            if done:
                break
            self.sleep(1.0)
        else:
            done = False
        out = {"drained": bool(ok and done), "seconds": round(time.monotonic() - started, 1), "state": why}
        self.drains.append(out)
        return out

    def sent_request_ids(self) -> set[str]:
        path = self.workdir / "requests.log"
        return {line for line in path.read_text().split("\n") if line} if path.exists() else set()

    # -- faults -----------------------------------------------------------------------------------
    def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        at = round(time.monotonic() - self.t0, 1)
        if kind == "broker":
            d = self.drain(self.cfg.drain_timeout_s)
            self.say(f"broker restart: drain {d}")
            baselines = {n: self.progress(n) or 0.0 for n in PROGRESS}
            self.procs["broker"].sigkill()
            self.procs["broker"].start()
            restarted = time.monotonic()
            self.wait_broker()
            if not self.collector.reset_to_beginning():
                raise RuntimeError("the collector did not reset after the broker restart")
            self.producer.resume(new_epoch=True)
            rec = self.wait_progress(list(PROGRESS), baselines, restarted, self.cfg.recovery_timeout_s)
            for n, s in rec.items():
                if s is not None:
                    self.recovery_by_component[n].append(s)
            worst = None if any(v is None for v in rec.values()) else max(rec.values())
            self.timeline.append({"at_s": at, "fault": kind, "recovery_s": worst, "per_component": rec,
                                  "drain": d})
        else:
            p = self.procs[kind]
            p.sigkill()
            time.sleep(self.rng.uniform(0.2, 2.0))
            p.start()
            restarted = time.monotonic()
            rec = self.wait_progress([kind], {}, restarted, self.cfg.recovery_timeout_s)
            worst = rec[kind]
            self.timeline.append({"at_s": at, "fault": kind, "recovery_s": worst})
        if worst is None:
            self.not_recovered.append(f"{kind} fault at {at}s: no progress within {self.cfg.recovery_timeout_s}s")
        else:
            self.recovery[kind].append(worst)
        self.say(f"fault {kind} at {at}s: recovered in {worst}s")

    # -- run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        started = time.monotonic()
        self.say(f"work directory {self.workdir}; broker {self.bootstrap}")
        try:
            self.procs["broker"].start()
            self.wait_broker()
            for n in ("streamer", "trainer", "scorer"):
                self.procs[n].start()
            self.collector = Collector(self.settings)
            self.collector.start()
            self.producer = StreamProducer(self.settings, cfg, self.workdir)
            self.producer.start()
            # Warm-up: samples produced, learned, and requests answered by a published model.
            rec = self.wait_progress(list(PROGRESS), {}, started, cfg.warmup_timeout_s)
            self.say(f"warm: {rec}")
            if any(v is None for v in rec.values()):
                raise RuntimeError(f"pipeline did not warm up within {cfg.warmup_timeout_s}s: {rec}")
            stream_start = time.monotonic()
            plan = [k for k in KINDS for _ in range(cfg.faults_per_kind)]
            self.rng.shuffle(plan)
            # The faults go at seeded moments spread over the stream, each after the previous
            # recovered; the stream then runs on to its duration.
            slot = cfg.duration_s / (len(plan) + 1) if plan else cfg.duration_s
            for i, kind in enumerate(plan):
                at = stream_start + slot * i + self.rng.uniform(0.3, 1.0) * slot
                self.sleep(max(at - time.monotonic(), self.rng.uniform(cfg.min_gap_s, cfg.max_gap_s)))
                self.fault(kind)
            self.sleep(max(0.0, stream_start + cfg.duration_s - time.monotonic()))
            stream_s = time.monotonic() - stream_start
            self.say("stream over: draining")
            final = self.drain(cfg.drain_timeout_s)
            self.say(f"final drain: {final}")
            # Each component is still making progress? The final drain showed the trainer and the
            # scorer caught up; exit codes on SIGTERM come next.
            self.producer.stop.set()
            self.producer.resume()
            self.producer.join(60)
            self.collector.stop.set()
            self.collector.join(30)
            exits = {}
            for n in ("scorer", "trainer", "streamer", "broker"):
                exits[n] = self.procs[n].terminate()
            self.say(f"exit codes on SIGTERM: {exits}")
            figures = self.check(exits, stream_s, final)
        finally:
            for p in self.procs.values():
                if p.alive():
                    p.terminate(10)
            if self.producer is not None:
                self.producer.stop.set()
            if self.collector is not None:
                self.collector.stop.set()
        figures["wall_s"] = round(time.monotonic() - started, 1)
        return figures

    # -- checks -----------------------------------------------------------------------------------
    def read_event_log(self) -> list:
        ic, cc = Codec(Impression), Codec(Click)
        events = []
        with open(self.workdir / "events.log", "rb") as f:
            for line in f:
                kind, _, value = line.rstrip(b"\n").partition(b" ")
                events.append((ic if kind == b"i" else cc).decode(value))
        return events

    def check(self, exits: dict, stream_s: float, final: dict) -> dict:
        from trainer.service import learned_ids

        events = self.read_event_log()
        impressions = [e for e in events if isinstance(e, Impression)]
        P = self.settings.topics.partitions
        # Reference watermarks per partition (tests/pipeline_reference.py): windows closed before
        # the join's watermark are settled.
        merge_wm, join_wm = watermarks(events, P)
        settled = {e.event_id for e in impressions if e.ts + WINDOW_MS < join_wm[partition_of(e.user_id, P)] - 5_000}
        imp_ids = {e.event_id for e in impressions}

        labels = self.collector.labels
        missing_samples = sorted(settled - set(labels))
        invented = sorted(set(labels) - imp_ids)
        learned = learned_ids(self.settings.state_dir)
        learned_set = set(learned)
        learned_twice = len(learned) - len(learned_set)
        not_learned = sorted(set(labels) - learned_set)
        learned_unknown = sorted(learned_set - set(labels))
        requests = self.sent_request_ids()
        answers = self.collector.answers
        unanswered = sorted(requests - set(answers))
        unknown_answers = sorted(set(answers) - requests)
        answer_repeats = sum(n - 1 for n in answers.values())

        # Feature store vs the reference sequences (clicks up to the merge watermark).
        expected = reference_sequences([e for e in events if e.ts <= merge_wm[partition_of(e.user_id, P)]],
                                       self.settings.features.seq_len)
        store_mismatch = store_mismatches(self.settings, expected)

        stuck = list(self.not_recovered)
        if not final["drained"]:
            stuck.append(f"final drain: {final['state']}")
        bad_exits = {n: rc for n, rc in exits.items() if rc != 0}
        lost = len(missing_samples) + len(not_learned) + len(unanswered)
        dupes = len(self.collector.conflicts) + learned_twice
        figures = {
            "seed": self.cfg.seed,
            "stream_s": round(stream_s, 1),
            "faults": dict(self.faults),
            "recovery_s": {k: {"p50": pctl(v, 0.5), "max": max(v) if v else None, "n": len(v)}
                           for k, v in self.recovery.items()},
            "broker_recovery_by_component_s": {k: {"p50": pctl(v, 0.5), "max": max(v) if v else None}
                                               for k, v in self.recovery_by_component.items()},
            "events_produced": len(events),
            "impressions": len(impressions),
            "clicks": len(events) - len(impressions),
            "impressions_settled_checked": len(settled),
            "sample_ids": len(labels),
            "sample_messages": self.collector.sample_msgs,
            "sample_repeats_on_topic": self.collector.sample_msgs - len(labels),
            "samples_learned": len(learned_set),
            "score_requests": len(requests),
            "score_answers": sum(answers.values()),
            "score_answer_repeats": answer_repeats,
            "users_checked_in_store": len(expected),
            "messages_lost": lost,
            "duplicates_after_dedupe": dupes,
            "lost_detail": {"settled_impressions_without_sample": len(missing_samples),
                            "samples_not_learned": len(not_learned), "requests_unanswered": len(unanswered)},
            "duplicate_detail": {"sample_label_conflicts": len(self.collector.conflicts),
                                 "samples_learned_twice": learned_twice},
            "invented_samples": len(invented),
            "learned_unknown_samples": len(learned_unknown),
            "unknown_answers": len(unknown_answers),
            "store_mismatches": len(store_mismatch),
            "producer_send_failures": len(self.producer.failures),
            "producer_resends": self.producer.resends,
            "unexpected_exits": self.unexpected_exits,
            "not_recovered": stuck,
            "exit_codes_on_sigterm": exits,
            "bad_exit_codes": bad_exits,
            "drains_before_broker_restart": self.drains[:-1],
            "final_drain": final,
            "timeline": self.timeline,
            "workdir": str(self.workdir),
            "examples": {"missing": missing_samples[:5], "not_learned": not_learned[:5],
                         "unanswered": unanswered[:5], "conflicts": self.collector.conflicts[:5],
                         "store": store_mismatch[:5], "send_failures": self.producer.failures[:5]},
        }
        return figures


def problems(f: dict) -> list[str]:
    """Every check that failed (empty: the run passed)."""
    out = []
    if f["messages_lost"]:
        out.append(f"messages lost: {f['lost_detail']}")
    if f["duplicates_after_dedupe"]:
        out.append(f"duplicates after dedupe: {f['duplicate_detail']}")
    for key in ("invented_samples", "learned_unknown_samples", "unknown_answers", "store_mismatches",
                "producer_send_failures"):
        if f[key]:
            out.append(f"{key}: {f[key]}")
    if f["unexpected_exits"]:
        out.append(f"unexpected exits: {f['unexpected_exits']}")
    if f["not_recovered"]:
        out.append(f"stuck: {f['not_recovered']}")
    if f["bad_exit_codes"]:
        out.append(f"exit codes on SIGTERM: {f['bad_exit_codes']}")
    if f["impressions_settled_checked"] == 0 or f["score_requests"] == 0:
        out.append("nothing was checked")
    return out


def run_soak(cfg: SoakConfig) -> dict:
    figures = Soak(cfg).run()
    figures["problems"] = problems(figures)
    figures["config"] = {"duration_s": cfg.duration_s, "faults_per_kind": cfg.faults_per_kind,
                         "events_per_s": cfg.events_per_s, "requests_per_s": cfg.requests_per_s,
                         "partitions": PARTITIONS, "attribution_window_ms": WINDOW_MS}
    try:
        LAST_FIGURES.write_text(json.dumps(figures, indent=2, default=str))
    except OSError:
        pass
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of stream after warm-up")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults-per-kind", type=int, default=None,
                    help="faults of each kind (default: one per 100 s of stream, at least 2)")
    ap.add_argument("--events-per-s", type=float, default=60.0)
    ap.add_argument("--requests-per-s", type=float, default=2.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    n = a.faults_per_kind if a.faults_per_kind is not None else max(2, int(a.duration // 100))
    cfg = SoakConfig(duration_s=a.duration, seed=a.seed, faults_per_kind=n, events_per_s=a.events_per_s,
                     requests_per_s=a.requests_per_s, workdir=a.workdir, verbose=not a.quiet)
    figures = run_soak(cfg)
    print(json.dumps(figures, indent=2, default=str))
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
