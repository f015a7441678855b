"""One settings object for every component.

Precedence, lowest to highest: defaults < TOML file < environment (``DMRSTREAM_*``, nested
sections joined by ``__``, e.g. ``DMRSTREAM_KAFKA__BOOTSTRAP_SERVERS``) < explicit overrides
(command-line flags, passed as keyword arguments / a dotted-key dict).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "DMRSTREAM_CONFIG"


class KafkaSettings(BaseModel):
    """Connection and security options passed straight through to the Kafka clients."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "dmrstream"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    # The local tansu broker needs short group sessions (joins take half the session timeout).
    # Real Kafka is fine with these too; production deployments may raise them.
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    request_timeout_ms: int = 30_000


class TopicSettings(BaseModel):
    """Topic names (one prefix) and partitioning. User-keyed topics share one partition count."""

    prefix: str = "dmrstream."
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1)
    impressions: str = "impressions"
    clicks: str = "clicks"
    score_requests: str = "score-requests"
    scores: str = "scores"
    samples: str = "samples"
    model_updates: str = "model-updates"
    dead_letters: str = "dead-letters"

    # Topics keyed by user that are joined or looked up together: same key, same partition count.
    CO_PARTITIONED: ClassVar[tuple[str, ...]] = ("impressions", "clicks", "score_requests", "samples", "scores")
    SINGLE_PARTITION: ClassVar[tuple[str, ...]] = ("model_updates",)

    def name(self, logical: str) -> str:
        """Full topic name for a logical name such as ``"impressions"`` or ``"score_requests"``."""
        return self.prefix + getattr(self, logical.replace("-", "_"))

    def all_logical(self) -> list[str]:
        return [*self.CO_PARTITIONED, *self.SINGLE_PARTITION, "dead_letters"]


class LimitSettings(BaseModel):
    """Bounds enforced on every incoming message (SPEC section 3)."""

    max_message_bytes: int = Field(1_000_000, ge=1024)
    max_id_length: int = Field(128, ge=1)
    max_candidates: int = Field(1000, ge=1)
    max_sequence: int = Field(1000, ge=1)
    max_fields: int = Field(64, ge=0)
    min_ts_ms: int = 631_152_000_000  # 1990-01-01: catches seconds sent as milliseconds
    max_ts_ms: int = 4_102_444_800_000  # 2100-01-01


class JoinSettings(BaseModel):
    attribution_window_ms: int = Field(30 * 60 * 1000, ge=0)
    allowed_lateness_ms: int = Field(0, ge=0)
    emit_corrections: bool = False
    # How long after its window a labelled impression is remembered (None: W): clicks that late
    # are still recognised as late, redelivered impressions as repeats. Each one remembered
    # costs ~500 bytes of memory (bench/join.py), so this is half of what the join holds.
    late_horizon_ms: int | None = Field(None, ge=0)
    # When a clicked impression's sample leaves: at its window's close (every label in impression-time
    # order, so learning is not biased by positives arriving W ahead of their negatives) or at the click.
    positives_at: Literal["window_close", "click"] = "window_close"
    # An input silent this long (wall clock) while the other still flows stops holding the
    # watermark back. Long enough to ride out rebalances and upstream pauses.
    idle_input_s: float = Field(30.0, gt=0)


class FeatureSettings(BaseModel):
    seq_len: int = Field(50, ge=1, le=1000)
    dedupe_ids_per_user: int = Field(256, ge=1)
    retention_days: float = Field(30.0, gt=0)
    # Feature store (featurestore/): behaviours kept beyond seq_len serve point-in-time reads of
    # a slightly older time; counters keep this many recent event times for exact as_of reads.
    seq_keep_extra: int = Field(14, ge=0, le=1000)
    counter_points: int = Field(8, ge=1, le=64)
    block_cache_mb: int = Field(64, ge=0)
    fsync: bool = False  # fsync every batch (power-loss durability); a process crash is safe without


class ModelSettings(BaseModel):
    embedding_dim: int = 32
    small_embedding_dim: int = 8
    item_vocab_size: int = 1 << 20
    category_vocab_size: int = 1 << 16
    user_vocab_size: int = 1 << 20
    mlp_hidden: list[int] = [512, 256, 128]
    aux_negatives: int = 2000
    aux_weight: float = 0.1
    learning_rate: float = 1e-3
    batch_size: int = 256
    # trainer/ (DMR and baselines): hashed side-feature table, field slots per group, and the
    # embedding tables' own learning rate (sparse rows are touched rarely: they may need more).
    field_vocab_size: int = Field(1 << 18, ge=2)
    max_profile_fields: int = Field(8, ge=0, le=64)
    max_context_fields: int = Field(4, ge=0, le=64)
    max_item_fields: int = Field(8, ge=0, le=64)
    embedding_learning_rate: float = Field(1e-3, gt=0)
    # the additive logit terms (output bias, display-position bias) track the base rate faster
    bias_learning_rate: float = Field(0.02, gt=0)
    attention_hidden: list[int] = [80, 40]
    counter_smoothing: float = Field(5.0, ge=0)  # pseudo-impressions at the prior rate
    counter_prior: float = Field(0.5, gt=0, lt=1)
    time_gap_buckets: int = Field(16, ge=2, le=64)


class TrainerSettings(BaseModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_wait_ms: int = 500
    checkpoint_every_s: float = 30.0
    delta_every_s: float = 10.0
    full_every_s: float = 600.0
    keep_versions: int = 50
    metrics_retain_samples: int = Field(2_000_000, ge=1)  # prequential samples kept exactly (older: histogram and sums)
    # niceness of the prefetch process (trainer/prefetch.py): 19 lets the train step have the cores;
    # 0 on a host busy with other work, where a niced reader would starve
    prefetch_nice: int = Field(19, ge=0, le=19)


class StreamerSettings(BaseModel):
    """The streamer's batch loop (streamer/app.py): a batch is up to ``batch_max_events`` messages,
    taken once that many are buffered or ``batch_within_ms`` after the first arrived. Larger
    batches amortise the per-user and per-batch work (reads, record encoding, RocksDB writes) on a
    backlog at the price of each event waiting for its whole batch; a live stream below capacity
    sees small batches whatever the bound."""

    batch_max_events: int = Field(8000, ge=1)
    batch_within_ms: float = Field(250.0, ge=0)


class ScorerSettings(BaseModel):
    """Scorers (streamer/scoring*.py): micro-batching, threads, serving AUC and automatic rollback."""

    model_kind: Literal["dmr", "din", "lr"] = "dmr"
    max_batch: int = Field(64, ge=1)  # requests per forward pass
    max_batch_candidates: int = Field(2048, ge=1)  # ... and candidates per pass
    max_wait_ms: float = Field(2.0, ge=0)  # longest a request waits for others to batch with
    threads: int = Field(1, ge=1, le=256)  # torch intra-op threads
    score_impressions: bool = True  # score every impression (serving AUC per version)
    served_memory: int = Field(1_000_000, ge=1)  # served scores kept until their label arrives
    auc_window: int = Field(20_000, ge=10)  # labelled samples per version in its serving AUC
    rollback_min_samples: int = Field(2_000, ge=1)
    rollback_margin: float = Field(0.02, ge=0)  # AUC points below the predecessor that roll back
    auto_rollback: bool = True
    store_refresh_s: float = Field(1.0, gt=0)  # read-only feature-store views are reopened this often


class MetricsSettings(BaseModel):
    bind: str = "127.0.0.1"
    streamer_port: int = 9101
    trainer_port: int = 9102
    scorer_port: int = 9103
    dashboard_port: int = 8050


class Settings(BaseSettings):
    """Everything every component reads. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="DMRSTREAM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    limits: LimitSettings = LimitSettings()
    join: JoinSettings = JoinSettings()
    features: FeatureSettings = FeatureSettings()
    model: ModelSettings = ModelSettings()
    trainer: TrainerSettings = TrainerSettings()
    streamer: StreamerSettings = StreamerSettings()
    scorer: ScorerSettings = ScorerSettings()
    metrics: MetricsSettings = MetricsSettings()
    state_dir: Path = Path("state")
    model_store: str = "models"
    log_level: str = "INFO"

    @field_validator("model_store")
    @classmethod
    def _no_empty_store(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model_store must not be empty")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"kafka.bootstrap_servers": x}`` -> ``{"kafka": {"bootstrap_servers": x}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from defaults, then ``config_file`` (or ``$DMRSTREAM_CONFIG``), then the
    environment, then ``overrides`` (dotted keys such as ``"join.attribution_window_ms"``;
    ``None`` values mean "flag not given" and are skipped)."""
    previous = os.environ.get(CONFIG_ENV)
    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"settings file not found: {config_file}")
        os.environ[CONFIG_ENV] = str(config_file)
    try:
        nested = _nest(overrides or {})
        # Init kwargs replace whole sections, so merge flag values over the lower layers first.
        base = Settings()
        merged = {k: _merge(getattr(base, k).model_dump(), v) if isinstance(v, dict) else v
                  for k, v in nested.items()}
        return Settings(**merged) if merged else base
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
