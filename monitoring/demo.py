"""``dmrstream demo``: the whole pipeline in one command, on the embedded broker by default.

Children (each ``python -m dmrstream ...`` with the same global options, in its own session so a
terminal Ctrl-C reaches the demo only, and SIGTERMed by the kernel if the demo itself dies):
the local broker (unless ``--bootstrap``), the streamer, the trainer, the scorer (when this build
has ``dmrstream scorer``), the live page, and the stream: ``simulate`` paced so that event time
follows wall time (freshness is then meaningful), or ``replay`` of a MovieLens directory.

The demo's own defaults (small model, 10 s attribution window: the simulator's clicks come within
9.5 s, frequent deltas) come before the user's ``--set`` flags, so the user's win. At the end (or
on Ctrl-C) it reads the final figures from the page, SIGTERMs every child, waits, SIGKILLs
stragglers' process groups, checks that none is left, and prints the summary table.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

# Demo-sized settings (the user's --set flags come after these and win).
DEMO_SETS = {
    "topics.partitions": 2,
    "kafka.session_timeout_ms": 6000,
    "join.attribution_window_ms": 10_000,
    # The simulator's users act in sessions of seconds, so a positive learned at its click helps
    # the rest of the session more than impression-time order helps the model (bench/demo_stream_auc.py:
    # progressive AUC 0.638 at the click vs 0.604 held to the window's close, popularity 0.586/0.584;
    # on MovieLens, the default's case, it is the other way round: see README, Label join).
    "join.positives_at": "click",
    "model.item_vocab_size": 1 << 15,
    "model.user_vocab_size": 1 << 15,
    "model.category_vocab_size": 1024,
    "model.field_vocab_size": 1 << 14,
    "model.aux_negatives": 64,
    "model.batch_size": 64,
    "model.mlp_hidden": [128, 64],
    # Online learning from a short stream: sparse rows are touched rarely, so they need a larger
    # step than the defaults. Measured offline on the test's stream (first 19,000 samples in the
    # order the join emits them, 2 seeds, progressive AUC; a one-off script, not kept): 0.03/0.003 0.642,
    # 0.02/0.001 0.624. bench/demo_stream_auc.py reproduces the chosen setting: 0.638.
    "model.embedding_learning_rate": 0.03,
    "model.learning_rate": 0.003,
    "trainer.delta_every_s": 5.0,
    "trainer.full_every_s": 60.0,
    "trainer.checkpoint_every_s": 10.0,
    # full batches: Adam steps are the same size whatever the batch, so many tiny batches (a new
    # stream's first seconds are all positives) move the weights too far; ~0.4 s fills 64 here
    "trainer.max_wait_ms": 1000,
}
EVENTS_PER_SESSION = 18.0  # the simulator's mean (pages of 10 impressions + clicks), measured


@dataclass
class DemoOptions:
    duration_s: float = 180.0
    events_per_s: float = 300.0
    data: Optional[Path] = None
    seed: int = 1
    model: str = "dmr"
    device: Optional[str] = None
    workdir: Optional[Path] = None
    dashboard_port: Optional[int] = None
    live: Optional[bool] = None
    summary_json: Optional[Path] = None
    users: int = 2_000
    items: int = 5_000


@dataclass
class Child:
    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    essential: bool = True  # its early exit is a failure (the stream producer may finish)
    ended_early: Optional[int] = None
    pid: int = 0
    env: Optional[dict] = None

    def start(self, stdout=None) -> "Child":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=stdout if stdout is not None else f, stderr=f, env=self.env,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        f.close()
        self.pid = self.proc.pid
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def has_command(name: str) -> bool:
    """Whether this build's CLI has ``dmrstream NAME`` (the scorer arrives in its own issue)."""
    import typer.main

    from dmrstream.cli import app

    group = typer.main.get_command(app)
    return name in getattr(group, "commands", {})


def _global_params(ctx: typer.Context) -> dict:
    node = ctx.parent
    return dict(node.params) if node is not None else {}


def _fmt_set(key: str, value) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


class Demo:
    def __init__(self, ctx: typer.Context, opts: DemoOptions, console: Console | None = None):
        from dmrstream.cli import _parse_sets
        from dmrstream.settings import load_settings

        self.opts = opts
        self.console = console or Console()
        self.err = Console(stderr=True)
        g = _global_params(ctx)
        self.user_sets: list[str] = list(g.get("set_") or [])
        self.config = g.get("config")
        self.log_level = g.get("log_level") or "WARNING"
        self.external_bootstrap: Optional[str] = g.get("bootstrap")
        self.keep_workdir = opts.workdir is not None
        self.workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="dmrstream-demo-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {"streamer": free_port(), "trainer": free_port(), "scorer": free_port()}
        demo_sets = dict(DEMO_SETS) | {
            "state_dir": str(self.workdir / "state"), "model_store": str(self.workdir / "models"),
            "metrics.streamer_port": self.ports["streamer"], "metrics.trainer_port": self.ports["trainer"],
            "metrics.scorer_port": self.ports["scorer"]}
        if self.external_bootstrap:  # a shared cluster: topics of our own
            demo_sets["topics.prefix"] = f"demo{uuid.uuid4().hex[:6]}."
        self.sets = [_fmt_set(k, v) for k, v in demo_sets.items()] + self.user_sets
        self.settings = load_settings(self.config, _parse_sets(self.sets) | {
            "kafka.bootstrap_servers": self.external_bootstrap, "log_level": self.log_level})
        m = self.settings.metrics  # the user's --set metrics.*_port win over the free ports
        self.ports = {"streamer": m.streamer_port, "trainer": m.trainer_port, "scorer": m.scorer_port}
        want = opts.dashboard_port if opts.dashboard_port is not None else self.settings.metrics.dashboard_port
        self.dashboard_port = want if want and port_free(want, self.settings.metrics.bind) else free_port()
        host = self.settings.metrics.bind
        self.page = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.dashboard_port}/"
        self.children: list[Child] = []
        self.reference: dict[str, float] = {}  # AUCs of the whole planned stream
        self.stream_ref = None  # the planned stream's ReferenceAUCs (simulator only)
        self.stop = threading.Event()
        self.started = time.time()
        self.ended: float | None = None
        self.last_point: dict = {}
        self.last_state: dict = {}
        self.failures: list[str] = []
        self.stream_events = 0
        self.has_scorer = has_command("scorer")

    # -- commands -------------------------------------------------------------------------------
    def base(self, bootstrap: Optional[str]) -> list[str]:
        cmd = [sys.executable, "-m", "dmrstream", "--log-level", self.log_level]
        if self.config:
            cmd += ["--config", str(self.config)]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        for s in self.sets:
            cmd += ["--set", s]
        return cmd

    def child(self, name: str, args: list[str], bootstrap: Optional[str], essential=True, stdout=None) -> Child:
        c = Child(name, self.base(bootstrap) + args, self.workdir / "logs" / f"{name}.log", essential=essential,
                  env=child_env())
        c.start(stdout)
        self.children.append(c)
        return c

    def start_broker(self) -> str:
        if self.external_bootstrap:
            r = subprocess.run(self.base(self.external_bootstrap) + ["topics", "create"], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"topics create failed: {r.stdout[-500:]}{r.stderr[-500:]}")
            return self.external_bootstrap
        c = self.child("broker", ["broker", "--port", "0"], None, stdout=subprocess.PIPE)
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline and c.alive():
            line = c.proc.stdout.readline().decode().strip()
            if line:
                break
        if not line:
            raise RuntimeError(f"the local broker did not start (see {c.log})")
        threading.Thread(target=_drain, args=(c.proc.stdout,), daemon=True).start()
        return line

    def plan_stream(self) -> list[str]:
        """The producer's arguments; for the simulator also its reference AUCs (same seed, same stream)."""
        o = self.opts
        if o.data is not None:
            self.stream_events = 0
            return ["replay", str(o.data), "--speed", "max", "--rate", str(o.events_per_s), "--no-progress"]
        from replay.evaluate import ReferenceAUCs
        from replay.simulate import SimConfig, simulate

        n = int(o.events_per_s * o.duration_s)
        sessions_per_s = o.events_per_s / EVENTS_PER_SESSION
        start_ms = int(time.time() * 1000) + 3_000
        cfg = SimConfig(users=o.users, items=o.items, seed=o.seed, sessions_per_s=sessions_per_s, start_ms=start_ms)
        self.stream_ref = ReferenceAUCs(self.settings.join.attribution_window_ms)
        for ev in simulate(cfg, n):
            self.stream_ref.add(ev)
        ref = self.stream_ref.result()
        self.reference = {"popularity": round(ref.popularity_auc, 4), "oracle": round(ref.oracle_auc, 4)}
        self.stream_events = n
        return ["simulate", "--events", str(n), "--seed", str(o.seed), "--speed", "1",
                "--sessions-per-s", repr(sessions_per_s), "--start", str(start_ms), "--users", str(o.users),
                "--items", str(o.items), "--no-progress"]

    # -- page reading ---------------------------------------------------------------------------
    def poll_page(self) -> None:
        since = self.last_point.get("t", 0)
        try:
            with urllib.request.urlopen(f"{self.page}api/series?since={since}", timeout=2) as r:
                data = json.loads(r.read())
        except Exception:
            return
        if data.get("points"):
            # Keep the newest value of every key (a metric may be missing from one scrape).
            for p in data["points"]:
                for k, v in p.items():
                    if isinstance(v, dict):
                        merged = dict(self.last_point.get(k, {}))
                        merged.update(v)
                        self.last_point[k] = merged if k not in ("throughput",) else v
                    else:
                        self.last_point[k] = v
        self.last_state = data

    def figures(self) -> dict:
        p, s = self.last_point, self.last_state
        auc = p.get("auc", {})
        serving = sorted((int(k.split("v")[-1]), v) for k, v in auc.items() if k.startswith("serving v"))
        thr = p.get("throughput", {})
        totals = s.get("totals", {})
        versions = s.get("versions", [])
        fresh = p.get("freshness", {})
        return {
            "elapsed_s": round((self.ended or time.time()) - self.started, 1),
            "auc_window": auc.get("trainer (window)"),
            "auc_cumulative": auc.get("trainer (cumulative)"),
            "serving_auc": serving[-1][1] if serving else None,
            "serving_version": serving[-1][0] if serving else None,
            **self.reference_until(versions[-1]["trained_until_ts"] if versions else None),
            "events_in": sum(v for k, v in totals.items() if k.startswith("in ") and "samples" not in k),
            "events_per_s": sum(v for k, v in thr.items() if k.startswith("in ") and "samples" not in k),
            "samples_joined": totals.get("out samples", 0.0),
            "samples_learned": totals.get("trainer samples", 0.0),
            "trainer_samples_per_s": thr.get("trainer samples"),
            "model_version": p.get("version", {}).get("scorer", p.get("version", {}).get("trainer")),
            "versions_published": len(versions),
            "swaps": totals.get("swaps", 0.0),
            "dead_letters": totals.get("dead letters", 0.0),
            "freshness_s": fresh.get("scorer", fresh.get("latest published")),
            "lag": sum(p.get("lag", {}).values()) if p.get("lag") else None,
            "page": self.page,
        }

    def reference_until(self, trained_until_ts: int | None) -> dict:
        """Popularity and oracle AUCs over the impressions the model has learned up to (event
        time), so they compare with the trainer's cumulative AUC on the same span of the stream
        (the planned stream runs on past the demo's end, where popularity gets stronger)."""
        out = {"popularity_auc": self.reference.get("popularity"), "oracle_auc": self.reference.get("oracle"),
               "popularity_auc_stream": self.reference.get("popularity"), "reference_until_ts": None}
        if self.stream_ref is not None and trained_until_ts:
            r = self.stream_ref.result(until_ts=int(trained_until_ts))
            if r.impressions:
                out.update(popularity_auc=round(r.popularity_auc, 4), oracle_auc=round(r.oracle_auc, 4),
                           reference_until_ts=int(trained_until_ts))
        return out

    # -- views ----------------------------------------------------------------------------------
    def live_table(self) -> Table:
        f = self.figures()
        t = Table(title=f"dmrstream demo  {f['elapsed_s']:.0f}/{self.opts.duration_s:.0f} s   live page: {self.page}",
                  title_justify="left", show_header=False, min_width=72)
        t.add_column(style="dim")
        t.add_column(justify="right")
        t.add_row("AUC (trainer, window / cumulative)", f"{_f(f['auc_window'])} / {_f(f['auc_cumulative'])}")
        if self.has_scorer:
            t.add_row("serving AUC (latest version)", _f(f["serving_auc"]) +
                      (f"  (v{f['serving_version']})" if f["serving_version"] is not None else ""))
        if self.reference:
            t.add_row("reference: popularity / oracle AUC", f"{_f(f['popularity_auc'])} / {_f(f['oracle_auc'])}")
        t.add_row("events/s in", _n(f["events_per_s"]))
        t.add_row("samples joined / learned", f"{_n(f['samples_joined'])} / {_n(f['samples_learned'])}")
        t.add_row("trainer samples/s", _n(f["trainer_samples_per_s"]))
        t.add_row("model version (published)", "-" if f["model_version"] is None else f"v{f['model_version']:.0f}"
                  f"  ({f['versions_published']})")
        t.add_row("freshness", "-" if f["freshness_s"] is None else f"{f['freshness_s']:.1f} s")
        t.add_row("consumer lag", _n(f["lag"]))
        t.add_row("processes", "  ".join(f"{c.name}{'' if c.alive() else ' (exited)'}" for c in self.children))
        return t

    def summary_table(self, f: dict) -> Table:
        t = Table(title="dmrstream demo: summary", show_header=True, title_justify="left")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_row("ran for", f"{f['elapsed_s']:.0f} s")
        t.add_row("messages consumed (impressions + clicks, all consumers)", _n(f["events_in"]))
        t.add_row("events/s (planned)", _n(self.opts.events_per_s))
        t.add_row("samples joined / learned", f"{_n(f['samples_joined'])} / {_n(f['samples_learned'])}")
        t.add_row("AUC, trainer progressive (window)", _f(f["auc_window"]))
        t.add_row("AUC, trainer progressive (cumulative)", _f(f["auc_cumulative"]))
        if self.has_scorer:
            t.add_row("serving AUC (latest version)", _f(f["serving_auc"]))
        if self.reference:
            t.add_row("item-popularity AUC, same impressions (baseline)", _f(f["popularity_auc"]))
            t.add_row("oracle AUC, same impressions (best reachable)", _f(f["oracle_auc"]))
            if f["auc_cumulative"] is not None and f["popularity_auc"] is not None:
                t.add_row("model (cumulative) vs popularity baseline", f"{f['auc_cumulative'] - f['popularity_auc']:+.4f}")
        t.add_row("model versions published", str(f["versions_published"]))
        t.add_row("last model version", "-" if f["model_version"] is None else f"v{f['model_version']:.0f}")
        t.add_row("freshness at the end", "-" if f["freshness_s"] is None else f"{f['freshness_s']:.1f} s")
        t.add_row("dead letters", _n(f["dead_letters"]))
        t.add_row("processes left behind", str(f.get("processes_left", "?")))
        return t

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        prev = {sig: signal.signal(sig, lambda *_: self.stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            left = self.shutdown()
            for sig, h in prev.items():
                signal.signal(sig, h)
            self.finish(left)

    def _run(self) -> int:
        c = self.err
        c.print(f"[bold]dmrstream demo[/]: work directory {self.workdir}")
        try:
            bootstrap = self.start_broker()
        except Exception as e:
            self.failures.append(str(e))
            return 1
        c.print(f"broker: {bootstrap}{' (local, memory storage)' if not self.external_bootstrap else ''}")
        self.bootstrap = bootstrap
        producer_args = self.plan_stream()
        if self.reference:
            c.print(f"simulated stream: {self.stream_events:,} events at {self.opts.events_per_s:g}/s; "
                    f"popularity AUC {self.reference['popularity']:.4f}, oracle AUC {self.reference['oracle']:.4f}")
        self.child("streamer", ["streamer"], bootstrap)
        device = ["--device", self.opts.device] if self.opts.device else []
        self.child("trainer", ["trainer", "--model", self.opts.model, *device], bootstrap)
        if self.has_scorer:
            self.child("scorer", ["scorer"], bootstrap)
        else:
            c.print("[yellow]this build has no `dmrstream scorer` command: the demo runs without scorers "
                    "(no serving AUC)[/]")
        targets = [f"streamer=http://127.0.0.1:{self.ports['streamer']}/metrics",
                   f"trainer=http://127.0.0.1:{self.ports['trainer']}/metrics"]
        if self.has_scorer:
            targets.append(f"scorer=http://127.0.0.1:{self.ports['scorer']}/metrics")
        dash_args = ["dashboard", "--port", str(self.dashboard_port), "--interval", "1"]
        for t in targets:
            dash_args += ["--target", t]
        for k, v in self.reference.items():
            dash_args += ["--reference", f"{k}={v}"]
        self.child("dashboard", dash_args, bootstrap)
        c.print(f"live page: [bold]{self.page}[/]")
        self.child("stream", producer_args, bootstrap, essential=False)
        self.started = time.time()
        return self.watch()

    def watch(self) -> int:
        live = self.opts.live if self.opts.live is not None else self.console.is_terminal
        end = time.monotonic() + self.opts.duration_s
        last_line = 0.0
        view = Live(self.live_table(), console=self.console, refresh_per_second=2, transient=False) if live else None
        if view:
            view.start()
        try:
            while not self.stop.is_set() and time.monotonic() < end:
                self.stop.wait(1.0)
                self.poll_page()
                for ch in self.children:
                    if ch.ended_early is None and not ch.alive():
                        ch.ended_early = ch.proc.returncode
                        if ch.essential or ch.ended_early != 0:
                            self.failures.append(f"{ch.name} exited with code {ch.ended_early} (log: {ch.log})")
                if self.failures:
                    break
                if view:
                    view.update(self.live_table())
                elif time.monotonic() - last_line >= 10:
                    last_line = time.monotonic()
                    f = self.figures()
                    self.console.print(f"[{f['elapsed_s']:5.0f} s] AUC window {_f(f['auc_window'])} cumulative "
                                       f"{_f(f['auc_cumulative'])}  events/s {_n(f['events_per_s'])}  learned "
                                       f"{_n(f['samples_learned'])}  version {_n(f['model_version'])}  freshness "
                                       f"{_n(f['freshness_s'])} s  page {self.page}", highlight=False)
        finally:
            if view:
                view.update(self.live_table())
                view.stop()
        self.poll_page()
        self.ended = time.time()
        return 1 if self.failures else 0

    def shutdown(self, grace_s: float = 20.0) -> int:
        """SIGTERM every child (the stream first, the broker last), SIGKILL stragglers' process
        groups, and return how many processes are left (0 expected)."""
        order = [c for c in self.children if c.name == "stream"] + \
                [c for c in reversed(self.children) if c.name not in ("stream", "broker")] + \
                [c for c in self.children if c.name == "broker"]
        for group in (order[:-1], order[-1:]) if order and order[-1].name == "broker" else (order,):
            for ch in group:
                if ch.alive():
                    _signal_group(ch.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for ch in group:
                try:
                    ch.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.err.print(f"[yellow]{ch.name} ignored SIGTERM: killing it[/]")
                    _signal_group(ch.pid, signal.SIGKILL)
                    ch.proc.wait(10)
        # Whatever else is in the children's process groups (workers, the tansu binary).
        time.sleep(0.2)
        left = 0
        for ch in self.children:
            if _group_alive(ch.pid):
                _signal_group(ch.pid, signal.SIGKILL)
                time.sleep(0.2)
                left += int(_group_alive(ch.pid))
        return left

    def finish(self, left: int) -> None:
        f = self.figures()
        f["processes_left"] = left
        f["failures"] = self.failures
        f["exit_codes"] = {c.name: c.proc.returncode if c.proc else None for c in self.children}
        f["workdir"] = str(self.workdir)
        self.console.print(self.summary_table(f))
        for msg in self.failures:
            self.err.print(f"[red]{msg}[/]")
        if left:
            self.failures.append(f"{left} processes left behind")
        if self.opts.summary_json:
            self.opts.summary_json.write_text(json.dumps(f, indent=2, default=str))
        if self.failures:
            self.keep_workdir = True
            self.err.print(f"logs kept in {self.workdir / 'logs'}")
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.summary = f


def child_env() -> dict:
    """The children's environment. On a small machine every process gets one math thread:
    five busy processes on two cores with OpenMP thread pools each spin against one another."""
    env = dict(os.environ)
    if (os.cpu_count() or 1) <= 4:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(k, "1")
    return env


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies count as gone: look for a live member in /proc.
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _drain(stream) -> None:
    try:
        for _ in iter(lambda: stream.read(4096), b""):
            pass
    except Exception:
        pass


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _n(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.1f}"


def run_demo(ctx: typer.Context, settings, opts: DemoOptions) -> int:
    demo = Demo(ctx, opts)
    rc = demo.run()
    if rc == 0 and demo.summary.get("processes_left"):
        rc = 1
    return rc
