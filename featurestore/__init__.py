"""Feature store (SPEC section 4): per-user behaviour sequences, point-in-time counters and item
side features in RocksDB (rocksdict), one database per Kafka partition.

``PartitionStore`` is one partition's store; ``FeatureStore`` opens and closes them as a worker is
assigned and revoked partitions; ``open_partition_store(settings, p)`` opens one at the standard
place ``settings.state_dir / "featurestore" / f"p{p}"``.
"""

from featurestore.partitions import FeatureStore, open_partition_store, partition_path
from featurestore.reads import COUNTER_KEYS, SequenceBatch
from featurestore.store import Behaviour, PartitionStore

__all__ = ["Behaviour", "COUNTER_KEYS", "FeatureStore", "PartitionStore", "SequenceBatch",
           "open_partition_store", "partition_path"]
