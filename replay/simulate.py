"""A synthetic impression/click stream whose true click probability is known (the oracle).

World (fixed-size numpy state, so memory is constant however long it runs):
- ``items`` items in ``categories`` categories of power-law sizes; item popularity is power-law
  (Zipf ``item_alpha`` over a random ranking) and each item has a latent quality;
- ``users`` users of power-law activity, each with ``interest_slots`` interest categories of
  decreasing strength; at each session start, with probability ``drift``, one slot moves to a new
  category (interests drift, so a user's recent behaviour says more than their id);
- a session is a few pages of ``page_size`` items (positions 0..page_size-1) shown seconds apart;
  half the shown items come from the user's interests, half from global popularity.

Click probability of an impression (what ``Impression.true_ctr`` records):
``sigmoid(bias + pop*log_popularity + quality - position*log1p(pos) + interest*strength(user, cat)
+ sequence*recency_weighted_share(cat in the user's recent clicks) + repeat*[item recently clicked])``.
The last two depend on the user's RECENT clicked categories/items, strictly earlier than the page,
so a sequence model can beat item popularity, and the oracle AUC (true_ctr vs labels) is known.
Clicks come 1-9.5 s after their impression with the same ``request_id``. Deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from dmrstream.contracts import Click, Impression
from replay.records import Event

DEFAULT_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


@dataclass(frozen=True)
class SimConfig:
    users: int = 10_000
    items: int = 20_000
    categories: int = 100
    seed: int = 0
    start_ms: int = DEFAULT_START_MS
    sessions_per_s: float = 5.0  # event time: session starts per second, all users together
    page_size: int = 10
    mean_pages: float = 3.0  # pages per session: 1 + geometric, capped at max_pages
    max_pages: int = 10
    page_gap_s: float = 20.0  # mean extra event time between pages, on top of 10 s
    item_alpha: float = 1.1
    category_alpha: float = 0.8
    user_alpha: float = 0.6
    interest_slots: int = 3
    drift: float = 0.1
    recent: int = 8  # clicked items remembered per user (what the click probability reads)
    from_interest: float = 0.5  # share of shown items drawn from the user's interests
    # Click model coefficients (logit scale).
    bias: float = -3.2
    pop: float = 0.12
    quality_sd: float = 0.4
    position: float = 0.35
    interest: float = 1.4
    sequence: float = 1.8
    repeat: float = 0.8
    batch_sessions: int = 1024


_STRENGTHS = np.array([1.0, 0.6, 0.3, 0.15, 0.08, 0.04, 0.02, 0.01])
_MAX_CLICK_DELAY_MS = 9_500


class World:
    """The simulator's state: items, users' interests, recent clicks. All fixed-size arrays."""

    def __init__(self, cfg: SimConfig):
        if cfg.interest_slots > len(_STRENGTHS) or min(cfg.users, cfg.items, cfg.categories, cfg.page_size) < 1:
            raise ValueError("users/items/categories/page_size must be >= 1 and interest_slots <= 8")
        if cfg.items < cfg.categories:
            raise ValueError("need at least one item per category")
        self.cfg = cfg
        rng = self.rng = np.random.default_rng(cfg.seed)
        c, n = cfg.categories, cfg.items
        cat_w = 1.0 / np.arange(1, c + 1) ** cfg.category_alpha
        self.cat_p = cat_w / cat_w.sum()
        sizes = 1 + rng.multinomial(n - c, self.cat_p)  # every category has an item
        self.cat_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.cat_end = np.cumsum(sizes)
        self.item_cat = np.repeat(np.arange(c), sizes)  # items sit in category blocks
        item_w = 1.0 / rng.permutation(np.arange(1, n + 1)) ** cfg.item_alpha
        self.item_cum = np.cumsum(item_w)
        self.item_cum0 = np.concatenate([[0.0], self.item_cum[:-1]])
        self.item_logpop = np.log(item_w * n / item_w.sum()).astype(np.float32)
        self.item_quality = rng.normal(0.0, cfg.quality_sd, n).astype(np.float32)
        user_w = 1.0 / rng.permutation(np.arange(1, cfg.users + 1)) ** cfg.user_alpha
        self.user_cum = np.cumsum(user_w)
        self.interests = rng.choice(c, size=(cfg.users, cfg.interest_slots), p=self.cat_p).astype(np.int32)
        self.strengths = _STRENGTHS[:cfg.interest_slots].astype(np.float32)
        self.recent_item = np.full((cfg.users, cfg.recent), -1, np.int64)
        self.recent_cat = np.full((cfg.users, cfg.recent), -1, np.int32)
        self.recent_ptr = np.zeros(cfg.users, np.int32)
        self.busy_until = np.full(cfg.users, -1, np.int64)
        self.decay = (0.8 ** np.arange(cfg.recent)).astype(np.float32)  # by age: newest weighs most

    def sample_items(self, users: np.ndarray) -> np.ndarray:
        """page_size candidate items per user: from the user's interests or global popularity."""
        cfg, rng = self.cfg, self.rng
        shape = (len(users), cfg.page_size)
        slot = rng.choice(cfg.interest_slots, size=shape, p=self.strengths / self.strengths.sum())
        cats = self.interests[users[:, None], slot]
        lo, hi = self.item_cum0[self.cat_start[cats]], self.item_cum[self.cat_end[cats] - 1]
        u = rng.random(shape)
        in_cat = np.searchsorted(self.item_cum, lo + u * (hi - lo), side="right")
        global_ = np.searchsorted(self.item_cum, u * self.item_cum[-1], side="right")
        pick = np.where(rng.random(shape) < cfg.from_interest, in_cat, global_)
        return np.minimum(pick, cfg.items - 1)

    def click_prob(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True click probability of each (user, shown item, position); users x page_size."""
        cfg = self.cfg
        cats = self.item_cat[items]
        strength = ((self.interests[users][:, None, :] == cats[:, :, None]) * self.strengths).sum(-1)
        age = (self.recent_ptr[users][:, None] - 1 - np.arange(cfg.recent)[None, :]) % cfg.recent
        w = np.where(self.recent_cat[users] >= 0, self.decay[age], 0.0)  # users x recent
        wsum = np.maximum(w.sum(-1, keepdims=True), 1e-9)
        same_cat = (self.recent_cat[users][:, None, :] == cats[:, :, None])
        share = (same_cat * w[:, None, :]).sum(-1) / wsum
        repeat = (self.recent_item[users][:, None, :] == items[:, :, None]).any(-1)
        pos = np.log1p(np.arange(cfg.page_size, dtype=np.float32))[None, :]
        logit = (cfg.bias + cfg.pop * self.item_logpop[items] + self.item_quality[items] - cfg.position * pos
                 + cfg.interest * strength + cfg.sequence * share + cfg.repeat * repeat)
        return 1.0 / (1.0 + np.exp(-logit))

    def remember_clicks(self, users: np.ndarray, items: np.ndarray, clicked: np.ndarray) -> None:
        """Append each user's clicked items (in position order) to their recent ring. Users are
        distinct within a page step, so the fancy-indexed writes never collide."""
        for j in range(items.shape[1]):
            hit = clicked[:, j]
            if not hit.any():
                continue
            u, it = users[hit], items[hit, j]
            p = self.recent_ptr[u]
            self.recent_item[u, p] = it
            self.recent_cat[u, p] = self.item_cat[it]
            self.recent_ptr[u] = (p + 1) % self.cfg.recent

    def drift(self, users: np.ndarray) -> None:
        """Move one interest slot of some users to a new category."""
        moved = users[self.rng.random(len(users)) < self.cfg.drift]
        if len(moved):
            slot = self.rng.integers(0, self.cfg.interest_slots, len(moved))
            self.interests[moved, slot] = self.rng.choice(self.cfg.categories, size=len(moved), p=self.cat_p)


# Columns of generated events, kept as parallel numpy arrays until they are emitted in time order.
_COLS = ("ts", "seq", "user", "item", "cat", "ctr", "pos")


def _batches(cfg: SimConfig) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of sessions: all its impressions and clicks as arrays (not yet time-sorted), and
    the time before which nothing later can appear (``horizon``: the last session start)."""
    world = World(cfg)
    rng = world.rng
    clock = float(cfg.start_ms)
    n_imp = 0
    while True:
        gaps = rng.exponential(1000.0 / cfg.sessions_per_s, cfg.batch_sessions)
        starts = (clock + np.cumsum(gaps)).astype(np.int64)
        clock = float(starts[-1])
        users = np.searchsorted(world.user_cum, rng.random(cfg.batch_sessions) * world.user_cum[-1], side="right")
        users = np.minimum(users, cfg.users - 1)
        # One session per user at a time: drop repeats within the batch and users still in a session.
        _, first = np.unique(users, return_index=True)
        keep = np.zeros(len(users), bool)
        keep[first] = True
        keep &= world.busy_until[users] < starts
        users, starts = users[keep], starts[keep]
        world.drift(users)
        pages = np.minimum(1 + rng.geometric(1.0 / max(cfg.mean_pages, 1.0), len(users)) - 1, cfg.max_pages)
        page_gaps = (10_000 + rng.exponential(cfg.page_gap_s * 1000.0, (len(users), cfg.max_pages))).astype(np.int64)
        page_gaps[:, 0] = 0
        page_ts = starts[:, None] + np.cumsum(page_gaps, axis=1)
        world.busy_until[users] = page_ts[np.arange(len(users)), pages - 1] + _MAX_CLICK_DELAY_MS
        out = {k: [] for k in _COLS}
        for p in range(int(pages.max(initial=0))):
            live = pages > p
            u = users[live]
            items = world.sample_items(u)
            ctr = world.click_prob(u, items)
            clicked = rng.random(ctr.shape) < ctr
            world.remember_clicks(u, items, clicked)
            k = items.size
            imp_no = n_imp + np.arange(k).reshape(items.shape)
            n_imp += k
            ts = np.repeat(page_ts[live, p], cfg.page_size).reshape(items.shape)
            delay = np.minimum(1000 + rng.exponential(2000.0, items.shape), _MAX_CLICK_DELAY_MS).astype(np.int64)
            pos = np.broadcast_to(np.arange(cfg.page_size), items.shape)
            uu = np.broadcast_to(u[:, None], items.shape)
            # Impressions have seq 2n, their clicks 2n+1: a stable order for equal timestamps.
            for sel, t, seq, c in ((slice(None), ts, 2 * imp_no, ctr), (clicked, ts + delay, 2 * imp_no + 1, ctr)):
                out["ts"].append(t[sel].ravel())
                out["seq"].append(seq[sel].ravel())
                out["user"].append(uu[sel].ravel())
                out["item"].append(items[sel].ravel())
                out["cat"].append(world.item_cat[items[sel]].ravel())
                out["ctr"].append(c[sel].ravel())
                out["pos"].append(pos[sel].ravel())
        batch = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}
        batch["horizon"] = np.int64(clock)
        yield batch


def event_arrays(cfg: SimConfig) -> Iterator[dict[str, np.ndarray]]:
    """Time-ordered chunks of event columns. Events later than a batch's horizon wait for the
    next batch (bounded: at most one session's length), so chunks concatenate in event-time order."""
    carry: dict[str, np.ndarray] | None = None
    for batch in _batches(cfg):
        horizon = batch.pop("horizon")
        if carry is not None:
            batch = {k: np.concatenate([carry[k], batch[k]]) for k in _COLS}
        order = np.lexsort((batch["seq"], batch["ts"]))
        batch = {k: v[order] for k, v in batch.items()}
        cut = int(np.searchsorted(batch["ts"], horizon, side="left"))
        carry = {k: v[cut:] for k, v in batch.items()}
        yield {k: v[:cut] for k, v in batch.items()}


def simulate(cfg: SimConfig = SimConfig(), events: int | None = None) -> Iterator[Event]:
    """Impressions (with ``true_ctr``) and clicks in event-time order; ``events`` caps the count
    (None: endless). Event ids ``"sim{seed}:{n}:i"``/``":c"``, ``request_id`` ``"sim{seed}:{n}"``."""
    prefix = f"sim{cfg.seed}:"
    n = 0
    for chunk in event_arrays(cfg):
        for ts, seq, user, item, cat, ctr, pos in zip(*(chunk[k].tolist() for k in _COLS)):
            if events is not None and n >= events:
                return
            n += 1
            rid = f"{prefix}{seq >> 1}"
            if seq & 1:
                yield Click(event_id=rid + ":c", user_id=user, item_id=item, category_id=cat, ts=ts,
                            request_id=rid)
            else:
                yield Impression(event_id=rid + ":i", user_id=user, item_id=item, category_id=cat,
                                 ts=ts, request_id=rid, position=pos, true_ctr=ctr)
