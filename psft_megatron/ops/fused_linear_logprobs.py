"""Logits-free per-token log-probs and entropy: the output layer fused into the vocab-parallel op.

``fused_linear_logprobs(hidden, weight, labels)`` returns what
``vocab_parallel_logprobs(hidden @ weight.T, labels)`` returns - fp32 ``log p(label)`` (and the
entropy) under the full, all-rank softmax - without ever holding the ``[tokens, V/tp]``
logits: they are produced one ``[rows, vocab block]`` tile at a time, reduced to per-row
statistics and dropped. The math (statistics, their merge, the backward) is the one of
``docs/logprobs.md``; the tiling, the merge over vocabulary blocks and the gradient
products are in its section "Fused output layer".

Design:

* forward: the selected rows (``mask != 0``; masked rows are never projected) are processed
  in chunks of ``chunk_size`` rows; for each chunk the local vocabulary shard is walked in
  blocks, each tile ``z = h W_b^T`` is computed in the input dtype (rounded exactly as the
  output layer's logits would be), reduced to ``m, s, t`` and the target logit, and merged
  with the previous blocks (``docs/logprobs.md``, "Merging partial statistics"). The chunk's
  statistics are then all-gathered over the TP group (one collective per chunk) and merged;
* saved for backward: ``hidden`` (all-gathered over TP under sequence parallelism),
  ``weight`` and O(rows) statistics - no logits;
* backward: recomputes every tile's logits, forms ``dz`` from the saved statistics (no
  communication) and accumulates ``dh = dz W`` and ``dW = dz^T h`` in fp32; the hidden
  gradient is then summed over the TP group (all-reduce, or reduce-scatter under sequence
  parallelism), as megatron's column-parallel output layer does.

Transient memory is a few ``[rows, block]`` tiles, plus in the backward ONE fp32 accumulator
of the smaller of ``[selected rows, h]`` and ``[V/tp, h]`` (the other gradient is completed
block by block), plus the two gradients themselves in the input dtype. Under megatron's DDP
the weight has an fp32 ``main_grad`` (its slice of the gradient buffer): the weight gradient
is then added into it directly, as megatron's gradient-accumulation fusion does, and the row
chunks go outside, so neither full accumulator exists (only a ``[rows, h]`` fp32 tile of
``dh``); see :func:`_main_grad_of`.

On CPU, half-precision tiles are multiplied in fp32 (the products are then rounded to the
input dtype exactly like a bf16 GEMM with fp32 accumulation): CPUs without bf16 matrix units
run bf16 GEMMs 5-100x slower than fp32 ones.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from psft_megatron.ops.vocab_parallel_logprobs import (
    _all_gather_stats,
    _local_softmax_stats,
    _merge_logsumexp,
    _resolve_tp_group,
)

__all__ = ["fused_linear_logprobs", "default_fused_tiles"]

#: rows per chunk and vocabulary entries per block of a tile, by device type. A fp32 tile is
#: 1 MiB on CPU (cache-friendly; the fp32 copies of the tile's hidden rows and weight rows are
#: 7 MiB each at h = 3584) and 32 MiB on accelerators (large GEMMs).
_TILE_CPU = (512, 512)
_TILE_ACCEL = (1024, 8192)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def default_fused_tiles(device: Union[str, torch.device] = "cuda") -> Tuple[int, int]:
    """``(rows per chunk, vocabulary entries per block)`` of one tile on ``device``."""
    return _TILE_CPU if torch.device(device).type == "cpu" else _TILE_ACCEL


# --------------------------------------------------------------------------------------------
# GEMMs of one call
# --------------------------------------------------------------------------------------------
#: None until the first try: whether torch.mm(..., out_dtype=torch.float32) works on this device
_MM_OUT_DTYPE_OK = {}


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 output for half inputs (fp32 accumulation, no rounding of the result)."""
    key = a.device.type
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    return torch.mm(a.float(), b.float())


class _Tiles:
    """Buffers and GEMMs of one call: logits tiles in the input dtype, gradient products in fp32.

    ``upcast`` (CPU, half inputs): the operands of every GEMM are converted to fp32 per tile
    (reused buffers) and multiplied in fp32; elsewhere the GEMMs run in the input dtype.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, rows: int, block: int, entropy_buf: bool):
        self.dtype = weight.dtype
        self.device = weight.device
        self.upcast = self.device.type == "cpu" and self.dtype != torch.float32
        h = weight.shape[1]
        f32 = dict(dtype=torch.float32, device=self.device)
        self.g = torch.empty(rows * block, **f32)  # fp32 work tile (GEMM output / z - m / dz)
        self.e = torch.empty(rows * block, **f32) if entropy_buf else None
        self.z = None if self.dtype == torch.float32 else torch.empty(rows * block, dtype=self.dtype, device=self.device)
        self.hbuf = torch.empty(rows * h, **f32) if self.upcast else None
        self.wbuf = torch.empty(block * h, **f32) if self.upcast else None

    @staticmethod
    def _view(buf: torch.Tensor, r: int, c: int) -> torch.Tensor:
        return buf[: r * c].view(r, c)

    def rows(self, hidden: torch.Tensor, idx: Optional[torch.Tensor], a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the selection (``idx``; all rows when None) in the GEMM dtype."""
        h = hidden[a:b] if idx is None else hidden.index_select(0, idx[a:b])
        if not self.upcast:
            return h
        return self._view(self.hbuf, b - a, h.shape[1]).copy_(h)

    def block(self, weight: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """Vocabulary rows ``v0:v1`` of ``weight`` in the GEMM dtype."""
        w = weight[v0:v1]
        if not self.upcast:
            return w
        return self._view(self.wbuf, v1 - v0, w.shape[1]).copy_(w)

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits tile ``h @ w.T`` in the input dtype: ``(z, d, e)`` with ``d``/``e`` the fp32
        work views of the tile's shape (``d`` IS ``z`` for fp32 inputs; ``e`` None if unused)."""
        r, c = h.shape[0], w.shape[0]
        d = self._view(self.g, r, c)
        e = None if self.e is None else self._view(self.e, r, c)
        if self.dtype == torch.float32:
            torch.mm(h, w.t(), out=d)
            return d, d, e
        z = self._view(self.z, r, c)
        if self.upcast:
            torch.mm(h, w.t(), out=d)
            z.copy_(d)  # rounded to the input dtype, as the output layer's logits
        else:
            torch.mm(h, w.t(), out=z)
        return z, d, e

    def acc(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``out += a @ b`` in fp32 (``out`` fp32; ``a`` the fp32 ``dz`` tile or its transpose)."""
        if a.dtype == b.dtype == torch.float32:
            out.addmm_(a, b)
        else:  # accelerator, half operands: dz rounded to the input dtype, fp32 products
            out.add_(_mm_fp32(a.to(b.dtype), b))


def _main_grad_of(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The fp32 ``main_grad`` buffer megatron's DDP gives ``weight``, or None.

    megatron's ``DistributedDataParallel`` gives every parameter ``main_grad`` (a view into its
    gradient buffer, where the gradients of all micro-batches are summed) and
    ``grad_added_to_main_grad``; its backward hook adds ``param.grad`` into ``main_grad``
    unless a layer already did (``grad_added_to_main_grad``), the contract of megatron's
    gradient-accumulation fusion. Used only when the buffer is fp32 (a bf16 buffer would
    round every chunk's partial sum).
    """
    mg = getattr(weight, "main_grad", None)
    if (not isinstance(mg, torch.Tensor) or not hasattr(weight, "grad_added_to_main_grad")
            or mg.dtype != torch.float32 or tuple(mg.shape) != tuple(weight.shape)):
        return None
    return mg


def _dummy_weight_grad(weight: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:
    """What backward returns for ``weight`` once its gradient is in ``main_grad`` (megatron's
    contract): an unused tensor, so that DDP's hook still runs on the backward thread - zeros
    when ``zero_out_wgrad`` (a tied embedding on one stage: the embedding's own gradient is
    summed with it and added by the hook) - and ``grad_added_to_main_grad`` set."""
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(main_grad.shape, dtype=weight.dtype, device=weight.device)


# --------------------------------------------------------------------------------------------
# per-chunk statistics
# --------------------------------------------------------------------------------------------
def _merge_into(run, part):
    """Merge two partial ``(m, s, t)`` of disjoint vocabulary sets (``t`` max-relative or None)."""
    m1, s1, t1 = run
    m2, s2, t2 = part
    m = torch.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m
    w1, w2 = torch.exp(d1), torch.exp(d2)
    t = None if t1 is None else w1 * (t1 + d1 * s1) + w2 * (t2 + d2 * s2)
    return m, w1 * s1 + w2 * s2, t


def _chunk_local_stats(tiles: _Tiles, h: torch.Tensor, weight: torch.Tensor, local_y: torch.Tensor,
                       owned: torch.Tensor, block: int, want_t: bool) -> torch.Tensor:
    """This rank's ``[rows, k]`` statistics ``m, s, z_y[, t]`` of one row chunk over its shard."""
    vt = weight.shape[0]
    run = None
    zy = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    for v0 in range(0, vt, block):
        v1 = min(vt, v0 + block)
        z, d, e = tiles.logits(h, tiles.block(weight, v0, v1))
        # the target logit first: for fp32 inputs the statistics below work in place in z
        hit = owned & (local_y >= v0) & (local_y < v1)
        col = torch.where(hit, local_y - v0, torch.zeros_like(local_y)).unsqueeze(1)
        zy += torch.where(hit, z.gather(1, col).squeeze(1).float(), torch.zeros((), device=h.device))
        part = _local_softmax_stats(z, want_t, d, e)
        run = part if run is None else _merge_into(run, part)
    m, s, t = run
    cols = [m, s, zy] + ([t] if want_t else [])
    return torch.stack(cols, dim=1)


def _merge_ranks(allstats: torch.Tensor, valid: torch.Tensor, want_t: bool):
    """``[R, rows, k]`` per-rank statistics -> ``logp, H (or None), M, S`` per row (fp32)."""
    M, S, w = _merge_logsumexp(allstats[..., 0], allstats[..., 1])
    log_s = torch.log(S)
    zy = allstats[..., 2].sum(dim=0)
    logp = torch.where(valid, (zy - M) - log_s, torch.zeros_like(M))
    ent = None
    if want_t:
        m_rel = allstats[..., 0] - M.unsqueeze(0)
        ent = log_s - (w * (allstats[..., 3] + m_rel * allstats[..., 1])).sum(dim=0) / S
    return logp, ent, M, S


# --------------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------------
class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, sel, tp_group, rank, world, sequence_parallel, want_h, rows, block):
        if sequence_parallel and world > 1:
            h_all = torch.empty((world * hidden.shape[0], hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
            _ALL_GATHER_SINGLE(h_all, hidden.contiguous(), group=tp_group)
        else:
            h_all = hidden
        n = h_all.shape[0]
        if labels.shape[0] != n:
            raise ValueError(f"labels cover {labels.shape[0]} rows but hidden has {n} rows"
                             + (" after the sequence-parallel all-gather" if sequence_parallel and world > 1 else ""))
        vt = weight.shape[0]
        y = labels if sel is None else labels.index_select(0, sel)
        local_y = y - rank * vt
        owned = (local_y >= 0) & (local_y < vt)
        valid = (y >= 0) & (y < vt * world)
        n_sel = y.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp_sel = torch.zeros(n_sel, **f32)
        ent_sel = torch.zeros(n_sel, **f32)
        M = torch.zeros(n_sel, **f32)
        S = torch.ones(n_sel, **f32)

        rows = min(rows, max(n_sel, 1))
        tiles = _Tiles(h_all, weight, rows, min(block, vt), entropy_buf=want_h)
        for a in range(0, n_sel, rows):
            b = min(n_sel, a + rows)
            h = tiles.rows(h_all, sel, a, b)
            stats = _chunk_local_stats(tiles, h, weight, local_y[a:b], owned[a:b], block, want_h)
            # one exchange of the chunk's statistics over the TP group
            allstats = _all_gather_stats(stats, tp_group, world) if world > 1 else stats.unsqueeze(0)
            lp, ent, M[a:b], S[a:b] = _merge_ranks(allstats, valid[a:b], want_h)
            logp_sel[a:b] = lp
            if want_h:
                ent_sel[a:b] = ent
        del tiles

        if sel is None:
            logp, ent = logp_sel, ent_sel
        else:
            logp = torch.zeros(n, **f32).index_copy_(0, sel, logp_sel)
            ent = torch.zeros(n, **f32).index_copy_(0, sel, ent_sel)
        if not want_h:
            ctx.mark_non_differentiable(ent)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h_all, weight, sel, local_y, owned, valid, M, S, ent_sel)
        ctx.cfg = (tp_group, rank, world, sequence_parallel, want_h, rows, block, hidden.shape[0])
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h_all, weight, sel, local_y, owned, valid, M, S, ent = ctx.saved_tensors
        tp_group, rank, world, sequence_parallel, want_h, rows, block, n_local = ctx.cfg
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 9
        if not want_h:
            g_ent = None
        if (g_lp is None and g_ent is None) or not (need_dh or need_dw):
            return (None, None) + none

        def pick(g):
            return None if g is None else (g.float() if sel is None else g.float().index_select(0, sel))

        g_lp, g_ent = pick(g_lp), pick(g_ent)
        n_sel, vt, hdim = M.shape[0], weight.shape[0], weight.shape[1]
        # per-row coefficients: dz_j = e_j (a (z_j - M) + c) [+ g_lp at the owned target],
        # e_j = exp(z_j - M) (docs/logprobs.md, "Backward")
        neg_inv_s = -1.0 / S
        zero = torch.zeros((), device=M.device)
        if g_lp is not None:
            g_lp = torch.where(valid, g_lp, zero)
            tgt_add = torch.where(owned, g_lp, zero)
        if g_ent is None:
            coef_a, coef_c = None, neg_inv_s * g_lp
        else:
            c = g_ent * (ent - torch.log(S))
            if g_lp is not None:
                c = c + g_lp
            coef_a, coef_c = neg_inv_s * g_ent, neg_inv_s * c

        rows = min(rows, max(n_sel, 1))
        block = min(block, vt)
        tiles = _Tiles(h_all, weight, rows, block, entropy_buf=coef_a is not None)
        f32 = dict(dtype=torch.float32, device=weight.device)
        dh_all = torch.zeros_like(h_all) if need_dh else None
        dw = None
        main_grad = _main_grad_of(weight) if need_dw else None
        # ONE full fp32 accumulator: of dh (vocabulary blocks outside, each block's dW complete
        # after its inner loop) or of dW (row chunks outside, each chunk's dh complete); none
        # when dW goes straight into DDP's fp32 main_grad (row chunks outside).
        rows_outside = main_grad is not None or (need_dh and (not need_dw or n_sel > vt))

        def dz_tile(h, w, a, b, v0, v1):
            z, d, e = tiles.logits(h, w)
            torch.sub(z, M[a:b].unsqueeze(1), out=d) if z is d else d.copy_(z).sub_(M[a:b].unsqueeze(1))
            if coef_a is None:
                d.exp_().mul_(coef_c[a:b].unsqueeze(1))
            else:
                torch.exp(d, out=e)
                d.mul_(coef_a[a:b].unsqueeze(1)).add_(coef_c[a:b].unsqueeze(1)).mul_(e)
            if g_lp is not None:
                y = local_y[a:b]
                hit = owned[a:b] & (y >= v0) & (y < v1)
                col = torch.where(hit, y - v0, torch.zeros_like(y)).unsqueeze(1)
                d.scatter_add_(1, col, torch.where(hit, tgt_add[a:b], zero).unsqueeze(1))
            return d

        def store_dh(a, b, acc):
            val = acc.to(dh_all.dtype)
            if sel is None:
                dh_all[a:b] = val
            else:
                dh_all.index_copy_(0, sel[a:b], val)

        if rows_outside:
            # the weight gradient's accumulator: DDP's main_grad, or for fp32 weights the
            # gradient itself, else a full fp32 buffer
            if not need_dw:
                dw_acc = None
            elif main_grad is not None:
                dw_acc = main_grad
            else:
                dw_acc = torch.zeros((vt, hdim), **f32) if weight.dtype != torch.float32 else torch.zeros_like(weight)
            dh_acc = torch.empty((rows, hdim), **f32) if need_dh else None
            for a in range(0, n_sel, rows):
                b = min(n_sel, a + rows)
                h = tiles.rows(h_all, sel, a, b)
                acc = dh_acc[: b - a].zero_() if need_dh else None
                for v0 in range(0, vt, block):
                    v1 = min(vt, v0 + block)
                    w = tiles.block(weight, v0, v1)
                    d = dz_tile(h, w, a, b, v0, v1)
                    if need_dh:
                        tiles.acc(acc, d, w)
                    if need_dw:
                        tiles.acc(dw_acc[v0:v1], d.t(), h)
                if need_dh:
                    store_dh(a, b, acc)
            if main_grad is not None:
                dw = _dummy_weight_grad(weight, main_grad)
            elif need_dw:
                dw = dw_acc.to(weight.dtype)
                del dw_acc
        else:
            in_place = need_dh and sel is None and h_all.dtype == torch.float32  # dh itself accumulates
            dh_acc = dh_all if in_place else (torch.zeros((n_sel, hdim), **f32) if need_dh else None)
            dw = torch.empty_like(weight) if need_dw else None
            dw_blk = torch.empty((block, hdim), **f32) if need_dw else None
            for v0 in range(0, vt, block):
                v1 = min(vt, v0 + block)
                w = tiles.block(weight, v0, v1)
                wacc = dw_blk[: v1 - v0].zero_() if need_dw else None
                for a in range(0, n_sel, rows):
                    b = min(n_sel, a + rows)
                    h = tiles.rows(h_all, sel, a, b)
                    d = dz_tile(h, w, a, b, v0, v1)
                    if need_dh:
                        tiles.acc(dh_acc[a:b], d, w)
                    if need_dw:
                        tiles.acc(wacc, d.t(), h)
                if need_dw:
                    dw[v0:v1] = wacc
            if need_dh and not in_place:
                for a in range(0, n_sel, rows):
                    store_dh(a, min(n_sel, a + rows), dh_acc[a : min(n_sel, a + rows)])
                del dh_acc
        del tiles

        dh = None
        if need_dh:
            # every TP rank holds a part of dh (its vocabulary shard's contribution): sum them
            if world > 1 and sequence_parallel:
                dh = torch.empty((n_local, hdim), dtype=dh_all.dtype, device=dh_all.device)
                _REDUCE_SCATTER_SINGLE(dh, dh_all, group=tp_group)
            else:
                if world > 1:
                    dist.all_reduce(dh_all, group=tp_group)
                dh = dh_all
        return (dh, dw) + none


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
    mask: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    vocab_block_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of ``labels`` (and the entropy) under ``hidden @ weight.T``, logits-free.

    Args:
        hidden: ``[n, h]`` this rank's rows (fp32, bf16 or fp16). Without sequence parallelism
            every TP rank passes the same rows; with ``sequence_parallel=True`` rank ``r`` passes
            its shard ``[n/tp, h]`` (rows ``[r*n/tp, (r+1)*n/tp)``), all-gathered over TP first.
        weight: ``[V/tp, h]`` this rank's vocabulary shard of the output layer (rank ``r`` owns
            ids ``[r*V/tp, (r+1)*V/tp)``), same dtype as ``hidden``; e.g. the tied embedding.
        labels: ``[n]`` integer GLOBAL vocabulary ids of the (gathered) rows; outside ``[0, V)``
            = no target (log-prob 0, no gradient through it).
        tp_group: the tensor-parallel group; ``None``: megatron's when initialised, else none.
        sequence_parallel: ``hidden`` holds this rank's sequence shard (megatron's SP layout,
            rows = flattened ``[s, b]``).
        mask: optional ``[n]`` (nonzero = computed). Rows with ``mask == 0`` are never
            projected: their log-prob and entropy are returned as 0 and get no gradient. Must
            be the same on every rank of the TP group.
        return_entropy: also return the entropy of the full distribution.
        chunk_size: rows per chunk (one TP exchange of statistics per chunk). ``None``: 512 on
            CPU, 1024 on accelerators.
        vocab_block_size: vocabulary entries per tile. ``None``: 512 on CPU, 8192 on
            accelerators.

    Returns:
        fp32 ``logp [n]`` (nats, ``<= 0``) or ``(logp, entropy)``, equal within fp32 rounding to
        ``vocab_parallel_logprobs(hidden_all @ weight.T, labels)``, differentiable w.r.t.
        ``hidden`` and ``weight``; gradients are returned in their dtypes, accumulated in fp32.

    Communication: with SP, one all-gather of ``hidden`` forward and one reduce-scatter of its
    gradient backward; without SP (TP > 1), one all-reduce of the hidden gradient backward (as
    megatron's column-parallel output layer); one all-gather of ``[rows, 4]`` fp32 statistics
    per chunk forward. The math is in ``docs/logprobs.md`` ("Fused output layer").
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [n, h] and weight [V/tp, h] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _SUPPORTED:
        raise TypeError(f"hidden and weight must share one dtype of fp32/bf16/fp16, got {hidden.dtype} "
                        f"and {weight.dtype}")
    if labels.dim() != 1 or torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise TypeError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    for name, val in (("chunk_size", chunk_size), ("vocab_block_size", vocab_block_size)):
        if val is not None and (isinstance(val, bool) or int(val) <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {val}")
    group, rank, world = _resolve_tp_group(tp_group)
    rows, block = default_fused_tiles(hidden.device)
    rows, block = int(chunk_size or rows), int(vocab_block_size or block)
    sel = None
    if mask is not None:
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal labels shape {tuple(labels.shape)}")
        sel = torch.nonzero(mask.reshape(-1) != 0).reshape(-1)
    logp, ent = _FusedLinearLogprobs.apply(hidden, weight, labels.long(), sel, group, rank, world,
                                           bool(sequence_parallel and world > 1), bool(return_entropy), rows, block)
    return (logp, ent) if return_entropy else logp
