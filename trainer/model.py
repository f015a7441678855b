"""DMR (Deep Match to Rank, Lyu et al. AAAI 2020), DIN and logistic regression on one input layer.

Follows the paper and its reference code (lvze92/DMR): the User-to-Item network attends over the
behaviours with the position (+ behaviour type) as query, never the target; u . v' with v' from a
second item table is the relevance r; u over the first T-1 behaviours predicts the T-th behaviour
(auxiliary DeepMatch loss, sampled softmax); the Item-to-Item network is additive attention of
target, behaviour and position, giving u-hat and r-hat = sum of the pre-softmax scores.
Deviations from the reference, on purpose: padding gets exactly zero attention (the reference's
large negative fill makes an all-padding row uniform over padding); PReLU acts on the last
dimension; only the two user vectors the model needs (all T, first T-1) are computed instead of
the reference's T x T lower-triangular softmax (identical values, T times less memory).

The large hashed tables are ``nn.Embedding(sparse=True)`` updated by ``SparseAdam``: a step then
touches only the rows in the batch. Dense Adam over a 2^20-row table reads and writes all 2^20 rows
(and its two moment buffers) every step, which is what makes a plain loop slow on CPU
(bench/train_step.py measures both). Each table is one named weight tensor, so the trainer service
can diff touched rows into delta snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.features import NUM_BEHAVIORS, NUM_DENSE, POSITION_BUCKETS, Batch

ABLATIONS = ("u2i", "i2i", "aux_loss", "position", "shared_item_table", "time_gaps", "counters",
             "display_position")


@dataclass
class ModelConfig:
    """Shape and switches of a model. Ablation switches: see :data:`ABLATIONS`."""

    kind: str = "dmr"  # dmr | din | lr
    embedding_dim: int = 32
    small_dim: int = 8
    item_vocab: int = 1 << 20
    category_vocab: int = 1 << 16
    user_vocab: int = 1 << 20
    field_vocab: int = 1 << 18
    seq_len: int = 50
    profile_fields: int = 8
    context_fields: int = 4
    item_fields: int = 8
    mlp_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    time_gap_buckets: int = 16
    aux_negatives: int = 2000
    aux_weight: float = 0.1
    # switches
    u2i: bool = True
    i2i: bool = True
    aux_loss: bool = True
    position: bool = True
    shared_item_table: bool = False
    time_gaps: bool = False
    counters: bool = True
    display_position: bool = True  # the additive position-bias logit
    # False = dense embedding gradients (the plain-loop baseline of bench/train_step.py)
    sparse_embeddings: bool = True

    @classmethod
    def from_settings(cls, settings: Any, kind: str = "dmr", ablate: Iterable[str] = ()) -> "ModelConfig":
        """Config from ``settings.model``/``features``; ``ablate`` names switches to flip
        (``shared_item_table`` and ``time_gaps`` turn ON, the others OFF)."""
        m = settings.model
        cfg = cls(kind=kind, embedding_dim=m.embedding_dim, small_dim=m.small_embedding_dim,
                  item_vocab=m.item_vocab_size, category_vocab=m.category_vocab_size,
                  user_vocab=m.user_vocab_size, field_vocab=m.field_vocab_size,
                  seq_len=settings.features.seq_len, profile_fields=m.max_profile_fields,
                  context_fields=m.max_context_fields, item_fields=m.max_item_fields,
                  mlp_hidden=list(m.mlp_hidden), attention_hidden=list(m.attention_hidden),
                  time_gap_buckets=m.time_gap_buckets, aux_negatives=m.aux_negatives, aux_weight=m.aux_weight)
        return cfg.ablated(ablate)

    def ablated(self, ablate: Iterable[str]) -> "ModelConfig":
        changes = {}
        for name in ablate:
            name = name.replace("-", "_").removeprefix("no_")
            if name not in ABLATIONS:
                raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
            changes[name] = not getattr(self, name)
        return replace(self, **changes)


class PReLULast(nn.Module):
    """PReLU with one slope per channel of the LAST dimension (``nn.PReLU(n)`` uses dim 1)."""

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.prelu's channel axis is dim 1: on the 2-D view that is the last one. One fused kernel
        # (the where/ge/mul form made three passes over the tensor and their temporaries).
        return F.prelu(x.reshape(-1, x.shape[-1]), self.weight).reshape(x.shape)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where mask > 0; padding and all-padding rows get weight 0."""
    s = scores.float().masked_fill(mask <= 0, -1e9)
    return torch.softmax(s, dim=-1) * mask


def group_first_rows(group: torch.Tensor) -> torch.Tensor:
    """First row of each group of a non-decreasing (B,) group id tensor."""
    starts = torch.ones_like(group, dtype=torch.bool)
    starts[1:] = group[1:] != group[:-1]
    return starts.nonzero().squeeze(1)


def linear_of_concat(linear: nn.Linear, parts: list[torch.Tensor], group_parts: list[torch.Tensor] = (),
                     group: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(cat(parts + group_parts, -1))`` without materialising the broadcast concatenation:
    parts may have different leading shapes (e.g. target (B,1,E) next to positions (B,T,P)).
    ``group_parts`` are given once per group (G, ...) and projected once, then indexed by ``group``
    (B,): what the rows of a group share costs one projection, not one per row."""
    out, start = linear.bias, 0
    for p in parts:
        out = out + F.linear(p, linear.weight[:, start:start + p.shape[-1]])
        start += p.shape[-1]
    if group_parts:
        shared = torch.cat(list(group_parts), -1)
        out = out + F.linear(shared, linear.weight[:, start:start + shared.shape[-1]])[group]
        start += shared.shape[-1]
    assert start == linear.in_features
    return out


class AttentionScorer(nn.Module):
    """Reference-code attention unit: query aligned to the key width by dense + PReLU, then an
    MLP (sigmoid) over [q, k, q-k, q*k] -> one pre-softmax score per behaviour."""

    def __init__(self, query_dim: int, key_dim: int, hidden: list[int]):
        super().__init__()
        self.align = nn.Linear(query_dim, key_dim)
        self.align_act = PReLULast(key_dim)
        self.first = nn.Linear(4 * key_dim, hidden[0])
        rest: list[nn.Module] = []
        for a, b in zip(hidden, hidden[1:]):
            rest += [nn.Sigmoid(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*rest, nn.Sigmoid(), nn.Linear(hidden[-1], 1))
        self.key_dim = key_dim

    def forward(self, query_parts: list[torch.Tensor], keys: torch.Tensor,
                group_parts: list[torch.Tensor] = (), group: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, T). With ``group`` (B,) and ``keys``/``group_parts`` given per group
        (G, T, .), the projections of what a group shares are computed once per group."""
        k = self.key_dim
        w = self.first.weight
        q = self.align_act(linear_of_concat(self.align, query_parts, group_parts, group))  # (B|1, T|1, K)
        key_proj = F.linear(keys, w[:, k:2 * k] - w[:, 2 * k:3 * k])
        if group is not None:  # keys were given once per group
            key_proj, keys = key_proj[group], keys[group]
        # W [q, k, q-k, q*k] = (Wq + Wd) q + (Wk - Wd) k + Wp (q*k): same function, fewer FLOPs
        h = (F.linear(q, w[:, :k] + w[:, 2 * k:3 * k]) + key_proj
             + F.linear(q * keys, w[:, 3 * k:]) + self.first.bias)
        return self.rest(h).squeeze(-1)  # (B, T)

    def position_query_scores(self, context: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` when the query is the same for every row at a position: ``context``
        (T, Q) per position, ``keys`` (B, T, K). Then ``Wk' k + Wp (q_t * k) = (Wk' + Wp diag(q_t)) k``
        is ONE matmul per position (batched over T) and the query side is computed T times, not
        B x T times: a third of the U2I attention's FLOPs. Same function up to float rounding."""
        k, w = self.key_dim, self.first.weight
        q = self.align_act(self.align(context))  # (T, K)
        per_pos = (w[:, k:2 * k] - w[:, 2 * k:3 * k]) + w[:, 3 * k:] * q.unsqueeze(1)  # (T, H, K)
        query_part = F.linear(q, w[:, :k] + w[:, 2 * k:3 * k], self.first.bias).unsqueeze(1)  # (T, 1, H)
        h = torch.baddbmm(query_part, keys.transpose(0, 1), per_pos.transpose(1, 2))  # (T, B, H)
        return self.rest(h).squeeze(-1).t()  # (B, T)

    def segment_scores(self, query: torch.Tensor, group_parts: list[torch.Tensor], keys: torch.Tensor,
                       runs: list[tuple[int, int]]) -> torch.Tensor:
        """:meth:`forward` for rows grouped in contiguous runs (``runs``: (first row, rows) per group) whose
        query is ``[query (B, Q)] + group_parts (G, T, .)`` and whose keys are per group (G, T, K).

        Group by group in a (T, n, .) layout, with nothing gathered per row: within one group
        the key of position t is fixed, so ``Wq' q + Wp (q * k_t) = (Wq' + Wp diag(k_t)) q`` is
        ONE matmul per position (a batched matmul over T), half the FLOPs of the two in
        :meth:`forward`. Same function up to float rounding (tests compare)."""
        k, w = self.key_dim, self.first.weight
        qw = self.align.weight
        q_rows = F.linear(query, qw[:, :query.shape[-1]])  # (B, K)
        q_ctx = F.linear(torch.cat(list(group_parts), -1), qw[:, query.shape[-1]:], self.align.bias)  # (G, T, K)
        key_proj = F.linear(keys, w[:, k:2 * k] - w[:, 2 * k:3 * k], self.first.bias).unsqueeze(2)  # (G, T, 1, H)
        per_pos = (w[:, :k] + w[:, 2 * k:3 * k]) + w[:, 3 * k:] * keys.unsqueeze(2)  # (G, T, H, K)
        out = []
        for g, (start, n) in enumerate(runs):
            q = self.align_act(q_ctx[g].unsqueeze(1) + q_rows[start:start + n])  # (T, n, K)
            h = torch.baddbmm(key_proj[g], q, per_pos[g].transpose(1, 2))  # (T, n, H)
            out.append(self.rest(h).squeeze(-1).t())  # (n, T)
        return torch.cat(out, 0)


# Grouped inference goes group by group (AttentionScorer.segment_scores) when groups average at
# least this many rows; below it, the per-group Python loop costs more than gathering rows.
SEGMENT_MIN_ROWS = 8


class _DistinctRowsLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose gradient is a sparse tensor with one row per distinct
    id: the rows' gradients are summed here (one index_add) instead of emitted once per lookup
    (B x T rows) that SparseAdam's coalesce then sorts and sums (bench/train_step.py compares)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
        distinct, inverse = torch.unique(ids, return_inverse=True)
        ctx.save_for_backward(distinct, inverse)
        ctx.weight_shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        distinct, inverse = ctx.saved_tensors
        dim = grad.shape[-1]
        rows = grad.new_zeros(len(distinct), dim).index_add_(0, inverse.reshape(-1), grad.reshape(-1, dim))
        rows.masked_fill_((distinct == ctx.padding_idx).unsqueeze(1), 0.0)  # the padding row never learns
        # sorted distinct ids inside the table (the forward lookup checked the range)
        g = torch.sparse_coo_tensor(distinct.unsqueeze(0), rows, ctx.weight_shape, is_coalesced=True,
                                    check_invariants=False)
        return g, None, None


def lookup(table: nn.Embedding, *ids: torch.Tensor) -> list[torch.Tensor]:
    """``[table(i) for i in ids]`` in ONE lookup. Training a sparse table, its gradient then has
    one row per distinct id (see :class:`_DistinctRowsLookup`), not one sparse tensor per lookup
    with a row per occurrence that autograd concatenates and SparseAdam sorts."""
    if not (table.sparse and torch.is_grad_enabled() and table.weight.requires_grad):
        return [table(i) for i in ids]
    flat = torch.cat([i.reshape(-1) for i in ids]) if len(ids) > 1 else ids[0].reshape(-1)
    rows = _DistinctRowsLookup.apply(table.weight, flat, table.padding_idx)
    out, start = [], 0
    for i in ids:
        out.append(rows[start:start + i.numel()].reshape(*i.shape, -1))
        start += i.numel()
    return out


def _table(rows: int, dim: int, sparse: bool = True) -> nn.Embedding:
    emb = nn.Embedding(rows, dim, padding_idx=0, sparse=sparse)
    nn.init.normal_(emb.weight, std=0.01)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class InputLayer(nn.Module):
    """Embeds a :class:`Batch`: target item = [item, category] (2E), behaviours likewise, user id,
    hashed profile/context/item-side fields (small dim each, concatenated by slot), position,
    behaviour type and time-gap embeddings, and the counter features (dense)."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None, small: int | None = None):
        super().__init__()
        d = cfg.embedding_dim if dim is None else dim
        s = cfg.small_dim if small is None else small
        self.cfg, self.dim, self.small = cfg, d, s
        sp = cfg.sparse_embeddings
        self.item_emb = _table(cfg.item_vocab, d, sp)
        self.category_emb = _table(cfg.category_vocab, d, sp)
        self.user_emb = _table(cfg.user_vocab, d, sp)
        self.field_emb = _table(cfg.field_vocab, s, sp)
        self.behavior_emb = _table(NUM_BEHAVIORS, s, sparse=False)
        self.position_emb = _table(cfg.seq_len + 1, d, sparse=False)
        self.gap_emb = _table(cfg.time_gap_buckets, s, sparse=False)
        # Position bias: an additive logit per display position, learned apart from relevance so
        # that the rest of the model learns what is clicked *because of the item*, not of the slot
        # (as in YouTube's shallow tower / PAL). Row 0 (unknown, e.g. scoring a slate) is 0, so
        # scores of candidates are pure relevance.
        self.position_bias = nn.Embedding(POSITION_BUCKETS, 1, padding_idx=0)
        nn.init.zeros_(self.position_bias.weight)

    @property
    def static_width(self) -> int:
        """Width of the features every model's MLP gets (without sequence-derived ones)."""
        c = self.cfg
        return (self.dim + (c.profile_fields + c.context_fields + c.item_fields) * self.small
                + 2 * self.dim + 2 * self.dim + (NUM_DENSE if c.counters else 0))

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        B = b.item.shape[0]
        # grouped only for inference (training batches hold one row per user anyway)
        first = group_first_rows(b.group) if b.group is not None and not self.training else None
        rows = slice(None) if first is None else first
        item, hist_item = lookup(self.item_emb, b.item, b.hist_item[rows])
        category, hist_category = lookup(self.category_emb, b.category, b.hist_category[rows])
        target = torch.cat([item, category], -1)
        hist = torch.cat([hist_item, hist_category], -1)
        mask = b.mask[rows].to(hist.dtype)
        n = mask.sum(1, keepdim=True)
        pooled = (hist * mask.unsqueeze(-1)).sum(1) / n.clamp(min=1)
        group_hist, runs = None, None
        if first is not None:  # the sequence once per group; rows index their group's
            group_hist, hist, pooled = hist, None, pooled[b.group]
            starts = first.tolist()
            runs = list(zip(starts, [e - s for s, e in zip(starts, starts[1:] + [B])]))  # (first row, rows)
        profile, context, item_fields = lookup(self.field_emb, b.profile, b.context, b.item_fields)
        parts = [self.user_emb(b.user), profile.reshape(B, -1), context.reshape(B, -1), target,
                 item_fields.reshape(B, -1), pooled]
        if self.cfg.counters:
            parts.append(b.dense)
        # grouped: "hist" is None, "group_hist" (G, T, 2E) holds each group's behaviours once
        return {"static": torch.cat(parts, -1), "target": target, "hist": hist, "mask": b.mask,
                "group_hist": group_hist, "first": first, "runs": runs}

    def position_logit(self, b: Batch) -> torch.Tensor | float:
        """(B,) additive logit of the display position (0 where unknown or switched off)."""
        if not self.cfg.display_position:
            return 0.0
        return self.position_bias(b.display_position).squeeze(-1)


def _mlp(width: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), PReLULast(h)]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class DMR(nn.Module):
    """Deep Match to Rank. ``forward`` returns (logit (B,), extras) where extras holds the
    auxiliary loss (training), attention weights and the relevance terms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inputs = InputLayer(cfg)
        d, s, E = cfg.embedding_dim, cfg.small_dim, 2 * cfg.embedding_dim
        ctx_dim = s + (d if cfg.position else 0) + (s if cfg.time_gaps else 0)
        width = self.inputs.static_width
        if cfg.u2i:
            self.u2i_scorer = AttentionScorer(ctx_dim, E, cfg.attention_hidden)
            self.u2i_dense = nn.Linear(E, d)
            self.u2i_act = PReLULast(d)
            if not cfg.shared_item_table:
                self.target_item_emb = _table(cfg.item_vocab, d, cfg.sparse_embeddings)
            width += 1
        if cfg.i2i:
            self.i2i_scorer = AttentionScorer(E + ctx_dim, E, cfg.attention_hidden)
            width += E + 1
        self.mlp = _mlp(width, cfg.mlp_hidden)

    def _context(self, b: Batch, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        inp = self.inputs
        r = slice(None) if rows is None else rows
        parts = [inp.behavior_emb(b.hist_behavior[r])]
        if self.cfg.position:
            parts.append(inp.position_emb(b.hist_position[r]))
        if self.cfg.time_gaps:
            parts.append(inp.gap_emb(b.hist_gap[r]))
        return parts

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """v' of item rows: the second item table (or the first one when shared)."""
        if self.cfg.shared_item_table:
            return self.inputs.item_emb(rows)
        return self.target_item_emb(rows)

    def _user_vector(self, weights: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        pooled = torch.bmm(weights.unsqueeze(1).to(hist.dtype), hist).squeeze(1)
        return self.u2i_act(self.u2i_dense(pooled))

    def position_context(self, b: Batch) -> torch.Tensor | None:
        """The behaviours' context (behaviour type, position) once per position (T, Q) when it
        is the same for every row: every real behaviour of the batch has one type (clicks) and
        no time gaps are used. Else None. Padding positions then get a real position's context;
        they are masked everywhere scores are used, so nothing changes."""
        code = None if self.cfg.time_gaps else self._single_behavior(b)
        if code is None:
            return None
        T = b.hist_item.shape[1]
        steps = torch.arange(T - 1, -1, -1, device=b.hist_item.device)  # position of column t: T-1-t
        parts = [self.inputs.behavior_emb(torch.full_like(steps, code))]
        if self.cfg.position:
            parts.append(self.inputs.position_emb(steps))
        return torch.cat(parts, -1)

    def u2i_scores(self, b: Batch, hist: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Pre-softmax U2I scores (B, T). Its query is the behaviour type and the position only:
        with a per-position ``context`` (:meth:`position_context`, None when there is none) the
        scorer takes its cheaper form (one query per position, not per row and position)."""
        if context is not None:
            return self.u2i_scorer.position_query_scores(context, hist)
        return self.u2i_scorer(self._context(b), hist)

    @staticmethod
    def _single_behavior(b: Batch) -> int | None:
        """The one behaviour code of every real behaviour in the batch, else None."""
        codes = b.hist_behavior[b.mask > 0]
        if codes.numel() == 0:
            return None
        first = codes[0]
        return int(first) if bool((codes == first).all()) else None

    def aux_user_vector(self, b: Batch, hist: torch.Tensor | None = None,
                        scores: torch.Tensor | None = None) -> torch.Tensor:
        """u over all behaviours but the most recent one (the auxiliary loss's input)."""
        if hist is None:
            hist = self.inputs(b)["hist"]
        if scores is None:
            scores = self.u2i_scores(b, hist, self.position_context(b))
        prev_mask = b.mask.clone()
        prev_mask[:, -1] = 0
        return self._user_vector(masked_softmax(scores, prev_mask), hist)

    def forward(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.inputs(b)
        hist, mask = x["hist"], x["mask"]
        feats, extras = [x["static"]], {}
        # Rows of one group (a scorer's candidates for one user) share the user side: the U2I
        # attention and the behaviours' projections are computed once per group.
        first, g = x["first"], b.group
        # training batches: the behaviours' context once per position when it is (clicks only)
        pos_ctx = self.position_context(b) if first is None else None
        if self.cfg.u2i:
            if first is None:
                scores = self.u2i_scores(b, hist, pos_ctx)
                w = masked_softmax(scores, mask)
                u = self._user_vector(w, hist)
            else:
                gh = x["group_hist"]
                w = masked_softmax(self.u2i_scorer(self._context(b, first), gh), mask[first])
                u = self._user_vector(w, gh)[g]
                w = w[g]
            r = (u * self.item_vectors(b.item)).sum(-1, keepdim=True)
            feats.append(r)
            extras.update(u2i_weights=w, user_vector=u, r=r)
            if self.training and self.cfg.aux_loss:
                extras["aux_loss"] = self._aux_loss(b, hist, scores)
        if self.cfg.i2i:
            gh, runs = x["group_hist"], x["runs"]
            if first is None:  # the context projected once per position when it is shared
                ctx = self._context(b) if pos_ctx is None else [pos_ctx.unsqueeze(0)]
                scores = self.i2i_scorer([x["target"].unsqueeze(1), *ctx], hist)
            elif len(b.item) >= SEGMENT_MIN_ROWS * len(runs):  # large groups: group by group
                scores = self.i2i_scorer.segment_scores(x["target"], self._context(b, first), gh, runs)
            else:  # many small groups (e.g. one candidate per request): one pass, rows gathered
                scores = self.i2i_scorer([x["target"].unsqueeze(1)], gh, group_parts=self._context(b, first), group=g)
            w = masked_softmax(scores, mask)
            if first is None:
                u_hat = torch.bmm(w.unsqueeze(1).to(hist.dtype), hist).squeeze(1)
            else:  # each group's weights times its behaviours: no per-row copy of the sequence
                u_hat = torch.cat([w[s:s + n].to(gh.dtype) @ gh[i] for i, (s, n) in enumerate(runs)])
            r_hat = (scores * mask).sum(1, keepdim=True)
            feats += [u_hat, r_hat.to(u_hat.dtype)]
            extras.update(i2i_weights=w, r_hat=r_hat)
        return self.mlp(torch.cat(feats, -1)).squeeze(-1) + self.inputs.position_logit(b), extras

    def _aux_loss(self, b: Batch, hist: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Sampled softmax: u(first n-1 behaviours) . v'(n-th item) against k negatives drawn from
        the batch's behaviour items (a unigram sample, logQ-corrected like the reference's
        ``sampled_softmax_loss``); sequences shorter than 2 are masked out."""
        valid = b.mask.sum(1) >= 2
        if not bool(valid.any()):
            return hist.new_zeros(())
        u = self.aux_user_vector(b, hist, scores)[valid]
        label = b.hist_item[valid, -1]
        pool = b.hist_item[b.mask > 0]
        uniq, counts = torch.unique(pool, return_counts=True)
        k = self.cfg.aux_negatives
        neg_idx = torch.multinomial(counts.float(), max(k, 1), replacement=True)
        negs = uniq[neg_idx]
        log_q = torch.log(counts.float() * k / pool.numel())
        pos_logq = log_q[torch.searchsorted(uniq, label)]
        pos = (u * self.item_vectors(label)).sum(-1) - pos_logq
        neg = u @ self.item_vectors(negs).t() - log_q[neg_idx]
        neg = neg.float().masked_fill(negs.unsqueeze(0) == label.unsqueeze(1), -1e9)  # accidental hits
        logits = torch.cat([pos.float().unsqueeze(1), neg], 1)
        return F.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long, device=u.device))


class DIN(nn.Module):
    """Deep Interest Network baseline: target attention (query = target) over the behaviours."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inputs = InputLayer(cfg)
        E = 2 * cfg.embedding_dim
        self.scorer = AttentionScorer(E, E, cfg.attention_hidden)
        self.mlp = _mlp(self.inputs.static_width + E, cfg.mlp_hidden)

    def forward(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.inputs(b)
        hist = x["hist"] if x["first"] is None else x["group_hist"][b.group]
        w = masked_softmax(self.scorer([x["target"].unsqueeze(1)], hist), x["mask"])
        att = torch.bmm(w.unsqueeze(1).to(hist.dtype), hist).squeeze(1)
        logit = self.mlp(torch.cat([x["static"], att], -1)).squeeze(-1) + self.inputs.position_logit(b)
        return logit, {"din_weights": w}


class LogisticRegression(nn.Module):
    """One weight per hashed id (the input layer with width-1 embeddings) + linear counters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inputs = InputLayer(cfg, dim=1, small=1)
        self.linear = nn.Linear(self.inputs.static_width, 1)
        with torch.no_grad():
            self.linear.weight.fill_(1.0)  # a sum of the per-id weights ...
            if cfg.counters:
                self.linear.weight[0, -NUM_DENSE:] = 0.0  # ... plus learned counter weights

    def forward(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.linear(self.inputs(b)["static"]).squeeze(-1) + self.inputs.position_logit(b), {}


MODELS = {"dmr": DMR, "din": DIN, "lr": LogisticRegression}


def build_model(settings: Any, kind: str = "dmr", ablate: Iterable[str] = (), *,
                config: ModelConfig | None = None) -> nn.Module:
    """A model of ``kind`` (dmr|din|lr) from the settings, with optional ablations."""
    cfg = config or ModelConfig.from_settings(settings, kind, ablate)
    if cfg.kind not in MODELS:
        raise ValueError(f"unknown model {cfg.kind!r}; known: {', '.join(MODELS)}")
    return MODELS[cfg.kind](cfg)


class Optimizers:
    """SparseAdam for the hashed tables (touched rows only), Adam for everything dense."""

    def __init__(self, model: nn.Module, lr: float, embedding_lr: float, bias_lr: float | None = None):
        """``bias_lr``: the additive logit terms' own step (None: ``lr``). Click data is 1-10 %
        positive; at the dense step a fresh model spends hundreds of steps pulling every weight
        towards the base rate (and on a live stream, where positives arrive before the window
        closes on the negatives, the base rate moves). bench/demo_stream_auc.py, the demo's stream
        (19,000 samples in emission order, progressive AUC, 2 seeds): 0.638 with 0.02, 0.621 without."""
        sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
        sparse = [p for p in model.parameters() if id(p) in sparse_ids]
        base = [output_layer(model).bias, model.inputs.position_bias.weight] if bias_lr else []
        base_ids = {id(p) for p in base}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids and id(p) not in base_ids]
        self.sparse = torch.optim.SparseAdam(sparse, lr=embedding_lr) if sparse else None
        groups = [{"params": dense}] + ([{"params": base, "lr": bias_lr}] if base else [])
        self.dense = torch.optim.Adam(groups, lr=lr)

    def zero_grad(self) -> None:
        for o in (self.sparse, self.dense):
            if o is not None:
                o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in (self.sparse, self.dense):
            if o is not None:
                o.step()

    def state_dict(self) -> dict:
        return {"sparse": self.sparse.state_dict() if self.sparse else None, "dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.sparse and state.get("sparse"):
            self.sparse.load_state_dict(state["sparse"])
        self.dense.load_state_dict(state["dense"])


def build_optimizers(model: nn.Module, settings: Any) -> Optimizers:
    m = settings.model
    return Optimizers(model, m.learning_rate, m.embedding_learning_rate, m.bias_learning_rate)


def _autocast(device: torch.device):
    # bf16 on CUDA: no loss scaler needed (GradScaler and sparse gradients do not mix well)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def loss_of(model: nn.Module, b: Batch, logit_out: list | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    logit, extras = model(b)
    if logit_out is not None:
        logit_out.append(logit.detach())
    ctr = F.binary_cross_entropy_with_logits(logit.float(), b.label.float())
    loss = ctr
    aux = extras.get("aux_loss")
    if aux is not None:
        loss = loss + model.cfg.aux_weight * aux
    return loss, {"loss": float(loss.detach()), "ctr_loss": float(ctr.detach()),
                  "aux_loss": float(aux.detach()) if aux is not None else 0.0}


def output_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer (its bias is the model's base log-odds)."""
    return model.linear if isinstance(model, LogisticRegression) else model.mlp[-1]


def train_step(model: nn.Module, opts: Optimizers, b: Batch) -> dict[str, float]:
    """One optimiser step on a batch already on the model's device."""
    return scored_train_step(model, opts, b)[0]


def scored_train_step(model: nn.Module, opts: Optimizers, b: Batch) -> tuple[dict[str, float], torch.Tensor]:
    """One optimiser step, and the batch's click probabilities from the weights *before* it: the
    prequential score of :func:`predict` without a second forward pass (training mode differs
    from evaluation only by the auxiliary loss: no dropout, no batch statistics)."""
    model.train()
    device = next(model.parameters()).device
    opts.zero_grad()
    logits: list[torch.Tensor] = []
    with _autocast(device):
        loss, stats = loss_of(model, b, logits)
    loss.backward()
    opts.step()
    return stats, torch.sigmoid(logits[0].float())


@torch.no_grad()
def predict(model: nn.Module, b: Batch) -> torch.Tensor:
    """Click probabilities (float32, on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    with _autocast(device):
        logit, _ = model(b)
    return torch.sigmoid(logit.float())


def pick_device(settings: Any) -> torch.device:
    want = settings.trainer.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
