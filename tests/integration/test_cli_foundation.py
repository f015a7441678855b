"""`dmrstream --help`, `dmrstream broker` and `dmrstream topics` as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = [sys.executable, "-m", "dmrstream"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*BIN, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_role_command():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("broker", "topics", "settings", "version"):
        assert cmd in out.stdout


def test_settings_command_shows_flag_and_env_values(monkeypatch):
    env = os.environ | {"DMRSTREAM_JOIN__ATTRIBUTION_WINDOW_MS": "1234"}
    out = subprocess.run([*BIN, "--bootstrap", "h:1", "settings"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"bootstrap_servers": "h:1"' in out.stdout
    assert '"attribution_window_ms": 1234' in out.stdout


def _tansu_pids() -> set[int]:
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"tansu" in (p / "cmdline").read_bytes().split(b"\0")[0]:
                    pids.add(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_command_prints_address_serves_topics_and_stops_cleanly(sig):
    before = _tansu_pids()
    proc = subprocess.Popen([*BIN, "broker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else address
        listed = run("--bootstrap", address, "topics", "list")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "dmrstream.impressions" in listed.stdout and "dmrstream.model-updates" in listed.stdout
        created = run("--bootstrap", address, "--set", "topics.prefix=other.", "topics", "create", "--partitions", "3")
        assert created.returncode == 0 and "created" in created.stdout
        mismatch = run("--bootstrap", address, "--set", "topics.prefix=other.", "topics", "create", "--partitions", "5")
        assert mismatch.returncode == 2 and "partitions" in mismatch.stdout
        started = _tansu_pids() - before
        assert len(started) == 1
    finally:
        proc.send_signal(sig)
        rc = proc.wait(15)
    assert rc == 0
    deadline = time.monotonic() + 5
    while _tansu_pids() & started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _tansu_pids() & started  # no broker left behind


def test_topics_list_against_no_broker_fails_with_a_message():
    out = run("--bootstrap", "127.0.0.1:1", "topics", "list", timeout=60)
    assert out.returncode == 1
    assert "cannot reach Kafka" in out.stdout
