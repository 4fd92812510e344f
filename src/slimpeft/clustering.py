"""Sliding clustering and the out-of-domain score d(x) of weight yielding (METHOD.md sections 3-4).

Notation: n tokens, c = ``n_clusters`` centres, i = d_in channels, b sequences, t positions.

Every adapted layer keeps, as buffers (never parameters, never in the optimizer):

* ``centers`` (c, i) and per-channel ``variances`` (c, i) of the training inputs it has seen;
* ``agg_mean`` / ``agg_var`` (c,): running mean and variance of the in-domain aggregate z-score of cluster k,
  which calibrate the threshold (a fixed threshold of 1 flags almost every token, METHOD.md);
* ``pool_mean`` / ``pool_var`` (): the same for the sequence-pooled standardized score, used when routing pools
  over the sequence (``ood_pooling != "token"``).

In training mode each forward pass assigns every real token to its nearest centre (Euclidean) and moves that
centre and variance towards the assigned tokens' mean and variance by an EMA with momentum m ("sliding").
Centres start from tokens of the first training batch. Under ``torch.distributed`` the per-cluster sums and
counts are all-reduced, and the initial centres broadcast from rank 0, so every rank holds identical clusters.
In eval mode nothing changes. The score of a forward pass is computed with the statistics *before* that pass's
update. d carries no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import SlimConfig
from .precision import autocast_off

_EPS = 1e-6


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows (n_r, i) of every rank concatenated in rank order; x itself outside torch.distributed."""
    if not _distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _floored(var: torch.Tensor, floor: float) -> torch.Tensor:
    """var_k <- max(var_k, floor * mean over clusters of var), per channel for (c, i), or for (c,)."""
    var = var.clamp_min(_EPS)
    return torch.maximum(var, floor * var.mean(0, keepdim=True)) if floor > 0 else var


# CPU: per-channel z-scores are computed this many elements (rows x channels) at a time. Fresh multi-MB tensors
# cost a page fault per 4 KiB page under glibc's allocator (it returns freed blocks to the OS), which made a layer's
# (n, i) z-score temporaries ~20 x slower than their arithmetic; 1 MiB blocks are reused without faults
# (BENCHMARKS.md section 1). On a GPU the caching allocator has no such cost, and every extra op is a kernel launch:
# one block there.
_CPU_BLOCK_ELEMENTS = 2**18


def _block_rows(x: torch.Tensor) -> int:
    """Rows of x (n, i) per block of the z-score computation: all of them off the CPU and under torch.compile (the
    generated code fuses the block's temporaries away)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return x.shape[0]
    return max(1, _CPU_BLOCK_ELEMENTS // max(1, x.shape[1]))


def _assign(x: torch.Tensor, centers: torch.Tensor, inv_sd: torch.Tensor, distance: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre k (n,) and aggregate z-score agg (n,) of tokens x (n, i) against centres (c, i) of 1 / sd
    inv_sd (c, i)."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row, so it drops out of the argmin.
    with autocast_off(x):  # float32 distances under mixed precision (precision.py)
        dist2 = torch.addmm((centers * centers).sum(-1), x, centers.T, alpha=-2.0)  # (n, c) in one matmul
    # min's indices, not argmin: the same first index of the minimum (ties, nan) and ~3.5 x faster on a CPU over
    # 16 columns (argmin's reduction is not vectorised there)
    k = dist2.min(-1).indices  # (n,)
    n, rows = x.shape[0], _block_rows(x)
    if rows >= n:  # one block: always off the CPU
        return k, _block_aggregate(x, k, centers, inv_sd, distance)
    agg = x.new_empty(n)
    for s in range(0, n, rows):
        agg[s : s + rows] = _block_aggregate(x[s : s + rows], k[s : s + rows], centers, inv_sd, distance)
    return k, agg


def _block_aggregate(x: torch.Tensor, k: torch.Tensor, centers: torch.Tensor, inv_sd: torch.Tensor, distance: str
                     ) -> torch.Tensor:
    """Aggregate z-scores (rows,) of tokens x (rows, i) against their centres k (rows,)."""
    # index_select, not c[k]: a row gather that is ~3x faster on CPU than advanced indexing; |c_k - x| in place on
    # the gathered rows (equal to |x - c_k| bit for bit)
    z = centers.index_select(0, k).sub_(x).abs_().mul_(inv_sd.index_select(0, k))  # (rows, i)
    return _aggregate(z, distance)


def _aggregate(z: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-channel z-scores (n, i) -> one aggregate per token (n,): 'max' or 'rms'."""
    return z.amax(-1) if distance == "max" else z.square().mean(-1).sqrt()


def _calibrated_tau(agg_mean: torch.Tensor, agg_var: torch.Tensor, floor: float, threshold_std: float
                    ) -> torch.Tensor:
    """Threshold of the calibrated score per cluster, mu_k + threshold_std * sd_k (sd floored), (c,)."""
    return agg_mean + threshold_std * _floored(agg_var, floor).sqrt()


def _score_affine(kind: str, agg_mean: torch.Tensor, agg_var: torch.Tensor, floor: float, threshold_std: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (c,), of the per-token score d = max(0, a_k agg - b_k) under ood_score ``kind``: 'paper' a = 1,
    b = 1; 'calibrated' a = 1, b = mu_k + threshold_std sd_k; 'standardized' a = 1 / sd_k, b = mu_k / sd_k +
    threshold_std."""
    one = torch.ones_like(agg_mean)
    if kind == "paper":
        return one, one
    if kind == "calibrated":
        return one, _calibrated_tau(agg_mean, agg_var, floor, threshold_std)
    inv = 1.0 / _floored(agg_var, floor).sqrt()
    return inv, agg_mean * inv + threshold_std


def _token_u(agg: torch.Tensor, k: torch.Tensor, agg_mean: torch.Tensor, agg_var: torch.Tensor, kind: str,
             floor: float, threshold_std: float) -> torch.Tensor:
    """Per-token value (n,) from the aggregates: the score d >= 0 of ood_score ``kind`` ('paper', 'calibrated',
    'standardized'), or (kind 'u') the standardized aggregate (agg - mu_k) / sd_k."""
    if kind == "paper":  # a = b = 1 (_score_affine), without the launches that multiply by one
        return (agg - 1.0).clamp_min(0.0)
    if kind == "calibrated":  # a = 1
        return (agg - _calibrated_tau(agg_mean, agg_var, floor, threshold_std)[k]).clamp_min(0.0)
    if kind == "u":
        return (agg - agg_mean[k]) / _floored(agg_var, floor).sqrt()[k]
    a, b = _score_affine(kind, agg_mean, agg_var, floor, threshold_std)
    return (agg * a[k] - b[k]).clamp_min(0.0)


def _local_sums(x: torch.Tensor, k: torch.Tensor, agg: torch.Tensor, w: torch.Tensor, c: int,
                scatter: bool | None = None) -> torch.Tensor:
    """This process's weighted sums for a sliding step as one (c, 3 + 2i) matrix, per cluster k (n,): the count
    (column 0), the sums of the tokens x (n, i) and of their aggregates agg (n,) side by side (columns 1 .. i + 1),
    and the sums of their squares (columns i + 2 ..); w (n,) 1 for the tokens that count, 0 for padding. One matrix:
    one all-reduce per layer under torch.distributed, and ``_slide`` reads channels and aggregate together.
    ``scatter``: row scatter-adds (default on a CPU in eager mode) or one one-hot matmul (elsewhere, and under
    torch.compile, whose CPU code for the scatter-adds was ~6 x slower than eager's)."""
    n, i = x.shape
    if (x.device.type == "cpu" and not torch.compiler.is_compiling()) if scatter is None else scatter:
        # row scatter-adds, ~3-4 x faster than the one-hot matmul on a CPU (BENCHMARKS.md section 1); padding goes to
        # a spare row c that is dropped. On a GPU they would be atomic adds (run-to-run nondeterministic): the
        # matmul stays there.
        kk = torch.where(w > 0, k, c)  # (n,)
        s1 = x.new_zeros(c + 1, i).index_add_(0, kk, x)  # (c + 1, i)
        s2 = torch.zeros_like(s1)
        rows = _block_rows(x)
        for s in range(0, n, rows):  # the squares by blocks, as the z-scores (fresh pages)
            xs = x[s : s + rows]
            s2.index_add_(0, kk[s : s + rows], xs * xs)
        aw = agg * w
        a = agg.new_zeros(c + 1, 3).index_add_(0, kk, torch.stack([w, aw, agg * aw], 1))  # count, sums of agg, agg^2
        return torch.cat([a[:c, :1], s1[:c], a[:c, 1:2], s2[:c], a[:c, 2:]], dim=1)  # (c, 3 + 2i)
    onehot = x.new_zeros(n, c).scatter_(1, k[:, None], w[:, None])  # (n, c): each token's weight in its column
    with autocast_off(x):  # float32 sums under mixed precision (precision.py)
        xa = torch.cat([x, agg[:, None].to(x.dtype)], dim=1)  # (n, i + 1)
        return onehot.T @ torch.cat([x.new_ones(n, 1), xa, xa * xa], dim=1)  # (c, 3 + 2i)


def _agg_local_sums(agg: torch.Tensor, k: torch.Tensor, w: torch.Tensor, c: int) -> torch.Tensor:
    """(3, c) weighted count, sum and sum of squares of the aggregates agg (n,) per cluster k (n,), this process."""
    stats = torch.zeros(3, c, device=agg.device)
    stats[0].index_add_(0, k, w)
    stats[1].index_add_(0, k, agg * w)
    stats[2].index_add_(0, k, agg * agg * w)
    return stats


def _slide(stats: torch.Tensor, centers: torch.Tensor, variances: torch.Tensor, agg_mean: torch.Tensor,
           agg_var: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The EMA step from summed statistics: new (c, i + 1) means and variances (channels, then the aggregate's
    column) and whether any cluster got a token ().

    Channels and aggregate side by side as one (c, i + 1) matrix of means and one of variances, so that the update is
    a few launches instead of one set per statistic (a GPU pays a fixed host cost per kernel); the formulas are those
    of the statistics taken one by one, element for element."""
    i = centers.shape[1]
    count, s1, s2 = stats[:, 0], stats[:, 1 : 2 + i], stats[:, 2 + i :]  # (c,), (c, i + 1) sums, (c, i + 1) squares
    hit = (count > 0)[:, None]  # (c, 1): clusters that got a token; the others keep their statistics
    n_k = count.clamp_min(1.0)[:, None]  # equals count where hit
    mean = s1 / n_k  # (c, i + 1)
    var = s2 / n_k - mean * mean  # (c, i + 1)
    var[:, :i].clamp_min_(0.0)  # channel variances; the aggregate's is floored at _EPS
    var[:, i:].clamp_min_(_EPS)
    old_mean = torch.cat([centers, agg_mean[:, None]], dim=1)  # (c, i + 1)
    old_var = torch.cat([variances, agg_var[:, None]], dim=1)
    new_var = m * old_var + (1.0 - m) * var
    new_var[:, :i].clamp_min_(_EPS)
    new_mean = torch.where(hit, m * old_mean + (1.0 - m) * mean, old_mean)
    new_var = torch.where(hit, new_var, old_var)
    return new_mean, new_var, hit.any()


def _score_and_sums(x: torch.Tensor, w: torch.Tensor, centers: torch.Tensor, variances: torch.Tensor,
                    agg_mean: torch.Tensor, agg_var: torch.Tensor, distance: str, kind: str, floor: float,
                    threshold_std: float) -> tuple[torch.Tensor, ...]:
    """A training step's work before the all-reduce: nearest centres k, aggregates agg, the per-token value of
    ``_token_u`` (kind), and the local sums of ``_local_sums``."""
    k, agg = _assign(x, centers, torch.rsqrt(_floored(variances, floor)), distance)
    u = _token_u(agg, k, agg_mean, agg_var, kind, floor, threshold_std)
    return k, agg, u, _local_sums(x, k, agg, w, centers.shape[0])


class SlidingClusters(nn.Module):
    """EMA clusters over a layer's inputs and the calibrated out-of-domain score computed from them."""

    def __init__(self, d_in: int, config: SlimConfig, seed: int = 0) -> None:
        super().__init__()
        c = config.n_clusters
        self.config = config
        self.seed = seed
        self.register_buffer("centers", torch.zeros(c, d_in))
        self.register_buffer("variances", torch.ones(c, d_in))
        self.register_buffer("agg_mean", torch.zeros(c))
        self.register_buffer("agg_var", torch.ones(c))
        self.register_buffer("pool_mean", torch.zeros(()))
        self.register_buffer("pool_var", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, recurse=True):
        """As nn.Module's (``.to``, ``.cuda``, ``.half``, ``.bfloat16``), but the statistics stay float32, values
        untouched, when the model is cast (DeepSpeed's bf16 engine casts every buffer): EMA steps and sums of squares
        need float32's mantissa. Moves to another device are kept."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(new.device)  # the float32 values, where fn put the buffer
        return self

    # ----------------------------------------------------------------- assignment and aggregate
    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centre k (n,) and aggregate per-channel z-score agg (n,) of tokens x (n, i), float32."""
        return _assign(x, self.centers, self.inv_sd(), self.config.distance)

    def aggregate(self, z: torch.Tensor) -> torch.Tensor:
        """Per-channel z-scores (n, i) -> one aggregate per token (n,) under ``distance`` (max or rms)."""
        return _aggregate(z, self.config.distance)

    def _floored(self, var: torch.Tensor) -> torch.Tensor:
        """var_k <- max(var_k, spread_floor * mean over clusters of var), per channel for (c, i), or for (c,)."""
        return _floored(var, self.config.spread_floor)

    def inv_sd(self) -> torch.Tensor:
        """1 / sd of every cluster's channels (floored), (c, i)."""
        return torch.rsqrt(self._floored(self.variances))

    def agg_sd(self) -> torch.Tensor:
        """In-domain spread sd_k of every cluster's aggregate score (floored), (c,)."""
        return self._floored(self.agg_var).sqrt()

    def calibrated_tau(self) -> torch.Tensor:
        """Threshold of the calibrated score per cluster, mu_k + threshold_std * sd_k, (c,)."""
        cfg = self.config
        return _calibrated_tau(self.agg_mean, self.agg_var, cfg.spread_floor, cfg.threshold_std)

    def standardize(self, agg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """u = (agg - mu_k) / sd_k: the aggregate in units of cluster k's in-domain spread, (n,)."""
        return self._token_u(agg, k, "u")

    def score_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (c,), such that the per-token score is d = max(0, a_k agg - b_k) under ``ood_score``
        (``_score_affine``). One form for every mode, so the eval fast path can keep (a_k, b_k) per cluster in the
        table it gathers once per token."""
        cfg = self.config
        return _score_affine(cfg.ood_score, self.agg_mean, self.agg_var, cfg.spread_floor, cfg.threshold_std)

    def token_score(self, agg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per-token d >= 0 under the configured ``ood_score``, (n,)."""
        return self._token_u(agg, k, self.config.ood_score)

    def _token_u(self, agg: torch.Tensor, k: torch.Tensor, kind: str) -> torch.Tensor:
        cfg = self.config
        return _token_u(agg, k, self.agg_mean, self.agg_var, kind, cfg.spread_floor, cfg.threshold_std)

    def pooled_score(self, pooled_u: torch.Tensor) -> torch.Tensor:
        """d >= 0 of a pooled standardized score, in units of its own in-domain spread."""
        z = (pooled_u - self.pool_mean) * torch.rsqrt(self.pool_var.clamp_min(_EPS))
        return (z - self.config.threshold_std).clamp_min(0.0)

    # ----------------------------------------------------------------- training-time updates
    @torch.compiler.disable  # once per layer, with a seeded generator: eager (traced, every layer's seed would
    @torch.no_grad()           # recompile it, past dynamo's recompile limit)
    def initialize(self, x: torch.Tensor) -> None:
        """Centres := c tokens of the first batch (seeded draw), variances := the batch's channel variances.

        Under torch.distributed the first batch is the global one (every rank's tokens gathered in rank order), so
        the clusters start as a single process's would on the same global batch."""
        x = _all_gather_rows(x)
        n, c = x.shape[0], self.centers.shape[0]
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        idx = torch.randperm(n, generator=g)[:c] if n >= c else torch.randint(n, (c,), generator=g)
        self.centers.copy_(x[idx.to(x.device)])
        self.variances.copy_(x.var(0, unbiased=False).clamp_min(_EPS).expand_as(self.variances))
        if _distributed():
            dist.broadcast(self.centers, src=0)
            dist.broadcast(self.variances, src=0)
        k, agg = self.assign(x)
        self._update_agg_stats(agg, k, momentum=0.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, x: torch.Tensor, k: torch.Tensor, agg: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One sliding step from tokens x (n, i) assigned to k (n,) with aggregates agg (n,).

        ``valid`` (n,) bool marks the tokens that count (padding does not); it weights the tokens instead of
        selecting them, so no (n, i) copy and no host sync is needed. A step with no valid token changes nothing.
        """
        self.finish_step(_local_sums(x, k, agg, self._token_weights(x, valid), self.centers.shape[0]))

    @torch.no_grad()
    def score_step(self, x: torch.Tensor, valid: torch.Tensor | None, kind: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training step's scoring and local statistics in one call: (k, agg, u, sums), u the per-token value of
        ``kind`` (an ``ood_score`` mode, or 'u': the standardized aggregate) from the statistics before this step;
        ``finish_step(sums)`` then slides the clusters. Equal to ``assign``, ``token_score`` / ``standardize`` and
        ``update``."""
        cfg = self.config
        return _score_and_sums(x, self._token_weights(x, valid), self.centers, self.variances, self.agg_mean,
                               self.agg_var, cfg.distance, kind, cfg.spread_floor, cfg.threshold_std)

    @torch.no_grad()
    def finish_step(self, sums: torch.Tensor) -> None:
        """Slide the clusters by the local sums (c, 3 + 2i) of ``score_step`` / ``_local_sums``, summed over
        processes (one all-reduce)."""
        new_mean, new_var, any_hit = _slide(_all_reduce_sum(sums), self.centers, self.variances, self.agg_mean,
                                            self.agg_var, self.config.cluster_momentum)
        i = self.centers.shape[1]
        self.centers.copy_(new_mean[:, :i])
        self.agg_mean.copy_(new_mean[:, i])
        self.variances.copy_(new_var[:, :i])
        self.agg_var.copy_(new_var[:, i])
        self.n_updates.add_(any_hit)

    @staticmethod
    def _token_weights(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return x.new_ones(x.shape[0]) if valid is None else valid.to(x.dtype)  # (n,) 1 = counts, 0 = padding

    @torch.no_grad()
    def _agg_sums(self, agg: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(3, c) weighted count, sum and sum of squares of the aggregates agg (n,) per cluster k (n,), summed over
        processes."""
        return _all_reduce_sum(_agg_local_sums(agg, k, w, self.centers.shape[0]))

    @torch.no_grad()
    def _update_agg_stats(self, agg: torch.Tensor, k: torch.Tensor, momentum: float,
                          weight: torch.Tensor | None = None) -> None:
        w = torch.ones_like(agg) if weight is None else weight  # (n,)
        count, s1, s2 = self._agg_sums(agg, k, w)
        hit = count > 0
        if momentum == 0.0:  # initialisation: clusters that got no token take the global statistics
            n = count.sum().clamp_min(1.0)
            g_mean, g_var = s1.sum() / n, (s2.sum() / n - (s1.sum() / n) ** 2).clamp_min(_EPS)
            self.agg_mean.fill_(g_mean)
            self.agg_var.fill_(g_var)
        n_k = count.clamp_min(1.0)  # equals count where hit
        mean = s1 / n_k
        var = (s2 / n_k - mean * mean).clamp_min(_EPS)
        self.agg_mean.copy_(torch.where(hit, momentum * self.agg_mean + (1.0 - momentum) * mean, self.agg_mean))
        self.agg_var.copy_(torch.where(hit, momentum * self.agg_var + (1.0 - momentum) * var, self.agg_var))

    @torch.no_grad()
    def update_pool_stats(self, pooled_u: torch.Tensor, first: bool) -> None:
        """EMA of the mean/variance of sequence-pooled standardized scores (b,) of in-domain training data."""
        stats = _all_reduce_sum(
            torch.stack([pooled_u.new_full((), float(pooled_u.numel())), pooled_u.sum(),
                         (pooled_u * pooled_u).sum()])
        )
        n = stats[0].clamp_min(1.0)
        mean = stats[1] / n
        var = (stats[2] / n - mean * mean).clamp_min(_EPS)
        m = 0.0 if first else self.config.cluster_momentum
        self.pool_mean.copy_(m * self.pool_mean + (1.0 - m) * mean)
        self.pool_var.copy_(m * self.pool_var + (1.0 - m) * var)
