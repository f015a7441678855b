"""Reference AUCs of a stream: the oracle (true click probabilities) and item popularity.

Labels: an impression is positive when a click with its ``request_id`` and item arrives within
``window_ms`` (the join's attribution window; a request shows several items); clicks without a
request id are matched to the latest open impression of the same (user, item). The popularity
baseline scores an impression by its item's click rate from events STRICTLY earlier (smoothed
toward the global rate so far), the score a streaming "item CTR" model could have served.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from dmrstream.contracts import Click
from replay.records import Event


def auc(scores, labels) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(len(s), np.float64)
    # Average ranks over runs of equal scores.
    bounds = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass
class StreamAUCs:
    impressions: int
    clicks: int
    oracle_auc: float  # NaN when the stream carries no true_ctr
    popularity_auc: float


class ReferenceAUCs:
    """Feed events in stream order with :meth:`add`; :meth:`result` gives both AUCs so far.
    Memory: 25 bytes per impression plus the open (unlabelled) ones within the window."""

    def __init__(self, window_ms: int = 30 * 60 * 1000, prior: float = 5.0):
        self.window_ms, self.prior = window_ms, prior
        self.oracle, self.pop = array("d"), array("d")
        self.labels = bytearray()
        self.ts = array("q")  # impression times, to score a prefix of the stream
        self.open_by_request: dict[tuple, int] = {}  # (request id, item) -> impression
        self.open_by_pair: dict[tuple, int] = {}
        self.open_order: deque[tuple[int, tuple | None, tuple, int]] = deque()
        self.item_imps: dict = {}
        self.item_clicks: dict = {}
        self.total_imps = self.total_clicks = 0
        self.pending: list[tuple[bool, object]] = []  # count updates at the current ts
        self.cur_ts: int | None = None
        self.clicks = 0

    def add(self, ev: Event) -> None:
        if ev.ts != self.cur_ts:
            self._apply_pending()
            self.cur_ts = ev.ts
            self._expire(ev.ts)
        if type(ev) is Click:
            self.clicks += 1
            if ev.behavior != "click":
                return
            idx = self.open_by_request.pop((ev.request_id, ev.item_id), None) if ev.request_id is not None else None
            if idx is None:
                idx = self.open_by_pair.get((ev.user_id, ev.item_id))
            if idx is not None and not self.labels[idx]:
                self.labels[idx] = 1
                self.pending.append((True, ev.item_id))
            return
        g = (self.total_clicks + 1.0) / (self.total_imps + 2.0)
        n = self.item_imps.get(ev.item_id, 0)
        c = self.item_clicks.get(ev.item_id, 0)
        idx = len(self.labels)
        self.pop.append((c + self.prior * g) / (n + self.prior))
        self.oracle.append(ev.true_ctr if ev.true_ctr is not None else float("nan"))
        self.labels.append(0)
        self.ts.append(ev.ts)
        req = (ev.request_id, ev.item_id) if ev.request_id is not None else None
        if req is not None:
            self.open_by_request[req] = idx
        self.open_by_pair[(ev.user_id, ev.item_id)] = idx
        self.open_order.append((ev.ts, req, (ev.user_id, ev.item_id), idx))
        self.pending.append((False, ev.item_id))

    def _apply_pending(self) -> None:
        for is_click, item in self.pending:
            if is_click:
                self.item_clicks[item] = self.item_clicks.get(item, 0) + 1
                self.total_clicks += 1
            else:
                self.item_imps[item] = self.item_imps.get(item, 0) + 1
                self.total_imps += 1
        self.pending.clear()

    def _expire(self, now: int) -> None:
        while self.open_order and self.open_order[0][0] + self.window_ms < now:
            _, req, pair, idx = self.open_order.popleft()
            if req is not None and self.open_by_request.get(req) == idx:
                del self.open_by_request[req]
            if self.open_by_pair.get(pair) == idx:
                del self.open_by_pair[pair]

    def result(self, until_ts: int | None = None) -> StreamAUCs:
        """Both AUCs over the impressions so far, or only those at or before ``until_ts`` (to
        compare with a model that has learned the stream up to that event time)."""
        labels = np.frombuffer(bytes(self.labels), dtype=np.uint8)
        oracle = np.frombuffer(self.oracle, dtype=np.float64) if len(self.oracle) else np.zeros(0)
        pop = np.frombuffer(self.pop, dtype=np.float64) if len(self.pop) else np.zeros(0)
        if until_ts is not None and len(labels):
            keep = np.frombuffer(self.ts, dtype=np.int64) <= until_ts
            labels, oracle, pop = labels[keep], oracle[keep], pop[keep]
        has_truth = len(oracle) > 0 and not np.isnan(oracle).any()
        return StreamAUCs(impressions=len(labels), clicks=self.clicks,
                          oracle_auc=auc(oracle, labels) if has_truth else float("nan"),
                          popularity_auc=auc(pop, labels) if len(labels) else float("nan"))


def reference_aucs(events: Iterable[Event], window_ms: int = 30 * 60 * 1000) -> StreamAUCs:
    """Oracle and popularity-baseline AUCs of a time-ordered stream (see the module docstring)."""
    ref = ReferenceAUCs(window_ms)
    for ev in events:
        ref.add(ev)
    return ref.result()
