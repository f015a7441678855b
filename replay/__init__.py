"""Replay logs and simulate streams into Kafka (SPEC section 10).

Pure parts (parsers, merge, pacing, simulator, evaluation) are separate from I/O (the sinks):
- :mod:`replay.sources`: command-line paths -> one time-ordered record stream (format detection);
- :mod:`replay.movielens`, :mod:`replay.taobao`, :mod:`replay.alimama`, :mod:`replay.generic`,
  :mod:`replay.eventsfile`: the parsers;
- :mod:`replay.merge`, :mod:`replay.pacing`, :mod:`replay.runner`, :mod:`replay.sinks`;
- :mod:`replay.simulate`: the synthetic stream; :mod:`replay.evaluate`: oracle and popularity AUCs.
"""
