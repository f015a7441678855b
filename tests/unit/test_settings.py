"""Settings precedence: defaults < TOML file < environment < explicit overrides (flags)."""

import pytest

from dmrstream.settings import Settings, load_settings


@pytest.fixture
def toml_file(tmp_path):
    f = tmp_path / "dmrstream.toml"
    f.write_text(
        'state_dir = "/from/file"\n'
        "[kafka]\nbootstrap_servers = \"file:9092\"\n"
        "[join]\nattribution_window_ms = 1000\nallowed_lateness_ms = 5\n"
        "[topics]\npartitions = 6\n"
    )
    return f


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("DMRSTREAM_"):
            monkeypatch.delenv(k)


def test_defaults_bind_loopback_and_match_spec():
    s = load_settings()
    assert s.metrics.bind == "127.0.0.1"
    assert s.join.attribution_window_ms == 30 * 60 * 1000
    assert s.features.seq_len == 50
    assert s.model.embedding_dim == 32 and s.model.mlp_hidden == [512, 256, 128]
    assert s.topics.name("score_requests") == "dmrstream.score-requests"


def test_file_overrides_defaults(toml_file):
    s = load_settings(toml_file)
    assert s.kafka.bootstrap_servers == "file:9092"
    assert s.join.attribution_window_ms == 1000
    assert s.topics.partitions == 6
    assert str(s.state_dir) == "/from/file"
    # untouched fields keep their defaults
    assert s.features.seq_len == 50


def test_env_overrides_file(toml_file, monkeypatch):
    monkeypatch.setenv("DMRSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("DMRSTREAM_JOIN__ATTRIBUTION_WINDOW_MS", "2000")
    s = load_settings(toml_file)
    assert s.kafka.bootstrap_servers == "env:9092"
    assert s.join.attribution_window_ms == 2000
    # a field set only in the file survives an env override of a sibling field
    assert s.join.allowed_lateness_ms == 5
    assert s.topics.partitions == 6


def test_flags_override_env_and_file(toml_file, monkeypatch):
    monkeypatch.setenv("DMRSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    s = load_settings(toml_file, {"kafka.bootstrap_servers": "flag:9092", "join.allowed_lateness_ms": 9,
                                  "features.seq_len": None})
    assert s.kafka.bootstrap_servers == "flag:9092"
    assert s.join.allowed_lateness_ms == 9
    assert s.join.attribution_window_ms == 1000  # from the file: a flag on a sibling keeps it
    assert s.features.seq_len == 50  # None means "flag not given"


def test_config_file_from_env_variable(toml_file, monkeypatch):
    monkeypatch.setenv("DMRSTREAM_CONFIG", str(toml_file))
    assert load_settings().topics.partitions == 6


def test_invalid_values_are_rejected(toml_file):
    with pytest.raises(ValueError):
        load_settings(overrides={"topics.partitions": 0})
    with pytest.raises(ValueError):
        load_settings(overrides={"kafka.security_protocol": "CARRIER_PIGEON"})
    with pytest.raises(FileNotFoundError):
        load_settings("/no/such/file.toml")


def test_secrets_are_masked_and_passed_through():
    from dmrstream.kafkaio import client_config

    s = load_settings(overrides={"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "SCRAM-SHA-512",
                                 "kafka.sasl_plain_username": "u", "kafka.sasl_plain_password": "hunter2",
                                 "kafka.ssl_cafile": "/ca.pem"})
    assert "hunter2" not in s.model_dump_json()
    cfg = client_config(s.kafka)
    assert cfg["security_protocol"] == "SASL_SSL"
    assert cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_password"] == "hunter2"
    assert cfg["ssl_cafile"] == "/ca.pem"
    assert "sasl_mechanism" not in client_config(Settings().kafka)
