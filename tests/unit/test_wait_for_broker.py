"""`wait_for_broker` without a broker: a stop flag ends the wait promptly (also while a probe hangs
on a listener that never answers), a bounded wait ends in BrokerUnavailable naming the address,
and a named waiter logs which address it waits for. Loopback sockets only."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from dmrstream.broker import free_port
from dmrstream.kafkaio import BrokerUnavailable, wait_for_broker
from dmrstream.settings import load_settings


def _settings(bootstrap: str):
    return load_settings(overrides={"kafka.bootstrap_servers": bootstrap})


def _stop_after(seconds: float) -> threading.Event:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return stop


def test_stop_ends_an_unbounded_wait_where_nothing_listens(caplog):
    port = free_port()
    with caplog.at_level(logging.INFO, logger="dmrstream.kafkaio"):
        started = time.monotonic()
        assert wait_for_broker(_settings(f"127.0.0.1:{port}"), timeout_s=None, stop=_stop_after(1.0),
                               waiter="tester", max_backoff_s=5.0) is False
        took = time.monotonic() - started
    assert 0.9 < took < 3.0  # promptly after the stop (generous: a loaded 2-core CI box)
    text = caplog.text
    assert f"tester: waiting for the Kafka broker at 127.0.0.1:{port}" in text
    assert "Connection refused" in text
    assert f"tester: stopped while waiting for the Kafka broker at 127.0.0.1:{port}" in text


def test_stop_already_set_returns_at_once():
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    assert wait_for_broker(_settings(f"127.0.0.1:{free_port()}"), timeout_s=None, stop=stop) is False
    assert time.monotonic() - started < 1.0


def test_stop_ends_the_wait_while_a_probe_hangs():
    """A listener that accepts and never speaks Kafka: kafka-python's bootstrap would hang for
    seconds; the waiter still returns within a fraction of a second of the stop."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # the kernel completes the handshakes; nobody ever answers
        started = time.monotonic()
        assert wait_for_broker(_settings(f"127.0.0.1:{srv.getsockname()[1]}"), timeout_s=None,
                               stop=_stop_after(0.5)) is False
        assert time.monotonic() - started < 2.5  # kafka-python alone would hang for ~10 s


def test_a_bounded_wait_raises_with_the_address():
    port = free_port()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port} after 0.5 s .*Connection refused"):
        wait_for_broker(_settings(f"127.0.0.1:{port}"), timeout_s=0.5)


def test_a_long_wait_says_so_again(caplog, monkeypatch):
    monkeypatch.setattr("dmrstream.kafkaio.STILL_WAITING_LOG_S", 0.3)  # 30 s in service
    with caplog.at_level(logging.WARNING, logger="dmrstream.kafkaio"):
        wait_for_broker(_settings(f"127.0.0.1:{free_port()}"), timeout_s=None, stop=_stop_after(1.2), waiter="tester")
    assert "tester: still waiting after" in caplog.text
