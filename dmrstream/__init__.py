"""dmrstream: streaming online learning of the DMR click-through-rate model.

This package holds what every component shares: settings, event contracts, Kafka plumbing,
the embedded local broker and the command line. Storage, streaming, training and monitoring
live in the top-level packages ``featurestore``, ``streamer``, ``trainer`` and ``monitoring``.
"""

__version__ = "0.1.0"
