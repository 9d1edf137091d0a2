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

from psft_megatron.ops.topk_entropy import check_topk, entropy_of_top_values, local_topk, merge_topk
from psft_megatron.ops.softmax_stats import (
    REDUCE_SCATTER_SINGLE,
    ALL_GATHER_SINGLE,
    all_gather_stats,
    local_softmax_stats,
    merge_blocks,
    merge_ranks,
    resolve_tp_group,
)

__all__ = ["fused_linear_logprobs", "default_fused_tiles", "RowSelection"]

#: rows per chunk and vocabulary entries per block of a tile, by device type. A fp32 tile is
#: 1 MiB on CPU (cache-friendly; the fp32 copies of the tile's hidden rows and weight rows are
#: 7 MiB each at h = 3584) and 32 MiB on accelerators (large GEMMs).
_TILE_CPU = (512, 512)
_TILE_ACCEL = (1024, 8192)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def default_fused_tiles(device: Union[str, torch.device] = "cuda") -> Tuple[int, int]:
    """``(rows per chunk, vocabulary entries per block)`` of one tile on ``device``."""
    return _TILE_CPU if torch.device(device).type == "cpu" else _TILE_ACCEL


# --------------------------------------------------------------------------------------------
# GEMMs of one call
# --------------------------------------------------------------------------------------------
#: None until the first try: whether torch.mm(..., out_dtype=torch.float32) works on this device
_MM_OUT_DTYPE_OK = {}


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 output for half inputs (fp32 accumulation, no rounding of the result).

    ``torch.mm(..., out_dtype=torch.float32)`` where the device supports it; where it does not
    (``TypeError``: a torch without the argument; ``NotImplementedError`` or a RuntimeError
    naming ``out_dtype``: no kernel for it) the fast path is turned off for that device type and
    the operands are multiplied in fp32. Any other error - out of memory included - propagates
    and leaves the fast path on.
    """
    key = a.device.type
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError) or "out_dtype" not in str(exc):
                raise
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
def _chunk_local_stats(tiles: _Tiles, h: torch.Tensor, weight: torch.Tensor, local_y: torch.Tensor,
                       owned: torch.Tensor, block: int, want_t: bool, topk: int = 0) -> torch.Tensor:
    """This rank's ``[rows, k]`` statistics ``m, s, z_y[, t]`` of one row chunk over its shard,
    followed (``topk > 0``) by the ``min(topk, V/tp)`` largest logits of each row: a running
    top-k merged block by block (``ops.topk_entropy``), so that ONE exchange carries both."""
    vt = weight.shape[0]
    run = top = None
    zy = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    for v0 in range(0, vt, block):
        v1 = min(vt, v0 + block)
        z, d, e = tiles.logits(h, tiles.block(weight, v0, v1))
        # the target logit and the top-k first: for fp32 inputs the statistics below work in
        # place in z
        hit = owned & (local_y >= v0) & (local_y < v1)
        col = torch.where(hit, local_y - v0, torch.zeros_like(local_y)).unsqueeze(1)
        zy += torch.where(hit, z.gather(1, col).squeeze(1).float(), torch.zeros((), device=h.device))
        if topk:
            top = merge_topk(top, local_topk(z, topk), topk)
        part = local_softmax_stats(z, want_t, d, e)
        run = part if run is None else merge_blocks(run, part)
    m, s, t = run
    cols = [m, s, zy] + ([t] if want_t else [])
    stats = torch.stack(cols, dim=1)
    return stats if top is None else torch.cat([stats, top], dim=1)


# --------------------------------------------------------------------------------------------
# the rows to compute
# --------------------------------------------------------------------------------------------
class RowSelection:
    """The rows whose mask is nonzero, found on the device without waiting for queued work.

    ``mask`` has the shape of the ``labels`` given to :func:`fused_linear_logprobs`: ``[b, s]``
    (the rows are then megatron's ``[s, b]`` order: the mask is transposed here) or ``[n]``.

    The loop over row chunks needs the number of selected rows on the host. On a CPU nothing is
    queued: the rows are found at once. On CUDA the compaction is queued on the device (a stable
    sort that puts the selected rows first, in order, and their count), the count is copied to
    pinned host memory without blocking and an event is recorded; :meth:`indices` waits on that
    event only. Made before the model's forward (as :class:`psft_megatron.losses.fused_output.
    FusedLogprobProcessor` does), the count is on the host long before the output layer runs:
    the host never waits for the decoder's kernels. Made right before the op, it waits for the
    work queued before it (a plain host sync, as ``torch.nonzero`` would).
    """

    def __init__(self, mask: torch.Tensor):
        if mask.dim() not in (1, 2):
            raise ValueError(f"mask must be [b, s] or [n], got {tuple(mask.shape)}")
        self.shape = tuple(mask.shape)
        keep = (mask.t() if mask.dim() == 2 else mask).reshape(-1) != 0
        self._indices = self._event = None
        if keep.device.type != "cuda":
            self._indices = torch.nonzero(keep).reshape(-1)
            return
        self._order = torch.argsort((~keep).to(torch.uint8), stable=True)  # selected rows first
        self._count = torch.empty((), dtype=torch.int64, pin_memory=True)
        self._count.copy_(keep.sum(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def indices(self) -> torch.Tensor:
        """int64 ``[n_selected]`` row indices (in the op's row order), on the mask's device."""
        if self._indices is None:
            self._event.synchronize()
            self._indices = self._order[: int(self._count)]
        return self._indices


# --------------------------------------------------------------------------------------------
# backward, step by step
# --------------------------------------------------------------------------------------------
def _grad_coefficients(g_lp, g_ent, valid, owned, S, ent):
    """Per-row ``(a, c, target)`` with ``dz_j = e_j (a (z_j - M) + c)`` and ``+ target`` at the
    owned label, ``e_j = exp(z_j - M)`` (docs/logprobs.md, "Backward"); ``a`` None without an
    entropy gradient, ``target`` None without a log-prob gradient."""
    neg_inv_s = -1.0 / S
    zero = torch.zeros((), device=S.device)
    target = None
    if g_lp is not None:
        g_lp = torch.where(valid, g_lp, zero)  # the log-prob of an invalid label is the constant 0
        target = torch.where(owned, g_lp, zero)
    if g_ent is None:
        return None, neg_inv_s * g_lp, target
    c = g_ent * (ent - torch.log(S))
    if g_lp is not None:
        c = c + g_lp
    return neg_inv_s * g_ent, neg_inv_s * c, target


class _DzTiles:
    """Recomputes a logits tile and turns it into its ``dz`` tile (fp32, in the work buffer)."""

    def __init__(self, tiles: _Tiles, M, coefs, local_y, owned):
        self.tiles, self.M, self.local_y, self.owned = tiles, M, local_y, owned
        self.a, self.c, self.target = coefs

    def __call__(self, h, w, a: int, b: int, v0: int, v1: int) -> torch.Tensor:
        z, d, e = self.tiles.logits(h, w)
        shift = self.M[a:b].unsqueeze(1)
        torch.sub(z, shift, out=d) if z is d else d.copy_(z).sub_(shift)
        if self.a is None:
            d.exp_().mul_(self.c[a:b].unsqueeze(1))
        else:
            torch.exp(d, out=e)
            d.mul_(self.a[a:b].unsqueeze(1)).add_(self.c[a:b].unsqueeze(1)).mul_(e)
        if self.target is not None:
            y = self.local_y[a:b]
            hit = self.owned[a:b] & (y >= v0) & (y < v1)
            col = torch.where(hit, y - v0, torch.zeros_like(y)).unsqueeze(1)
            d.scatter_add_(1, col, torch.where(hit, self.target[a:b], torch.zeros((), device=d.device)).unsqueeze(1))
        return d


def _store_rows(dh_all: torch.Tensor, sel: Optional[torch.Tensor], a: int, b: int, acc: torch.Tensor) -> None:
    """Write the fp32 hidden gradient of selected rows ``a:b`` into ``dh_all`` (its dtype)."""
    val = acc.to(dh_all.dtype)
    if sel is None:
        dh_all[a:b] = val
    else:
        dh_all.index_copy_(0, sel[a:b], val)


def _backward_rows_outside(dz: _DzTiles, h_all, weight, sel, n_sel, rows, block, dh_all, need_dw, main_grad):
    """Row chunks outside, vocabulary blocks inside: each chunk's ``dh`` is complete after its
    inner loop (a ``[rows, h]`` fp32 tile); ``dW`` accumulates whole - in DDP's fp32
    ``main_grad``, in the gradient itself for fp32 weights, else in a fp32 buffer. Returns the
    weight's gradient (None if not needed; a placeholder once it is in ``main_grad``)."""
    tiles, (vt, hdim) = dz.tiles, weight.shape
    if not need_dw:
        dw_acc = None
    elif main_grad is not None:
        dw_acc = main_grad
    else:
        dw_acc = torch.zeros((vt, hdim), dtype=torch.float32, device=weight.device)
    dh_acc = None if dh_all is None else torch.empty((rows, hdim), dtype=torch.float32, device=weight.device)
    for a in range(0, n_sel, rows):
        b = min(n_sel, a + rows)
        h = tiles.rows(h_all, sel, a, b)
        acc = None if dh_acc is None else dh_acc[: b - a].zero_()
        for v0 in range(0, vt, block):
            v1 = min(vt, v0 + block)
            w = tiles.block(weight, v0, v1)
            d = dz(h, w, a, b, v0, v1)
            if acc is not None:
                tiles.acc(acc, d, w)
            if dw_acc is not None:
                tiles.acc(dw_acc[v0:v1], d.t(), h)
        if acc is not None:
            _store_rows(dh_all, sel, a, b, acc)
    if main_grad is not None:
        return _dummy_weight_grad(weight, main_grad)
    return None if dw_acc is None else dw_acc.to(weight.dtype)


def _backward_vocab_outside(dz: _DzTiles, h_all, weight, sel, n_sel, rows, block, dh_all, need_dw):
    """Vocabulary blocks outside, row chunks inside: each block's ``dW`` is complete after its
    inner loop; ``dh`` accumulates whole in fp32 (in ``dh_all`` itself when that is fp32 and
    every row is selected). Returns the weight's gradient (None if not needed)."""
    tiles, (vt, hdim) = dz.tiles, weight.shape
    f32 = dict(dtype=torch.float32, device=weight.device)
    in_place = dh_all is not None and sel is None and dh_all.dtype == torch.float32
    dh_acc = dh_all if in_place else (None if dh_all is None else torch.zeros((n_sel, hdim), **f32))
    dw = torch.empty_like(weight) if need_dw else None
    dw_blk = torch.empty((block, hdim), **f32) if need_dw else None
    for v0 in range(0, vt, block):
        v1 = min(vt, v0 + block)
        w = tiles.block(weight, v0, v1)
        wacc = dw_blk[: v1 - v0].zero_() if need_dw else None
        for a in range(0, n_sel, rows):
            b = min(n_sel, a + rows)
            h = tiles.rows(h_all, sel, a, b)
            d = dz(h, w, a, b, v0, v1)
            if dh_acc is not None:
                tiles.acc(dh_acc[a:b], d, w)
            if need_dw:
                tiles.acc(wacc, d.t(), h)
        if need_dw:
            dw[v0:v1] = wacc
    if dh_acc is not None and not in_place:
        for a in range(0, n_sel, rows):
            _store_rows(dh_all, sel, a, min(n_sel, a + rows), dh_acc[a: min(n_sel, a + rows)])
    return dw


def _sum_hidden_grad(dh_all, n_local, tp_group, world, sequence_parallel):
    """Every TP rank holds its vocabulary shard's part of ``dh``: the sum is an all-reduce, or a
    reduce-scatter back to the rank's sequence shard under sequence parallelism."""
    if world > 1 and sequence_parallel:
        dh = torch.empty((n_local, dh_all.shape[1]), dtype=dh_all.dtype, device=dh_all.device)
        REDUCE_SCATTER_SINGLE(dh, dh_all, group=tp_group)
        return dh
    if world > 1:
        dist.all_reduce(dh_all, group=tp_group)
    return dh_all


# --------------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------------
def _gather_rows(hidden, tp_group, world: int, sequence_parallel: bool) -> torch.Tensor:
    """This rank's rows, all-gathered over TP under sequence parallelism (rows in [s, b] order)."""
    if not (sequence_parallel and world > 1):
        return hidden
    out = torch.empty((world * hidden.shape[0], hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    ALL_GATHER_SINGLE(out, hidden.contiguous(), group=tp_group)
    return out


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, sel, tp_group, rank, world, sequence_parallel, want_h, rows, block, topk):
        h_all = _gather_rows(hidden, tp_group, world, sequence_parallel)
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
        logp_sel, ent_sel, top_sel = (torch.zeros(n_sel, **f32) for _ in range(3))
        M, S = torch.zeros(n_sel, **f32), torch.ones(n_sel, **f32)
        rows = min(rows, max(n_sel, 1))
        k_stats = 4 if want_h else 3
        tiles = _Tiles(h_all, weight, rows, min(block, vt), entropy_buf=want_h)
        for a in range(0, n_sel, rows):
            b = min(n_sel, a + rows)
            stats = _chunk_local_stats(tiles, tiles.rows(h_all, sel, a, b), weight, local_y[a:b], owned[a:b],
                                       block, want_h, topk)
            # one exchange of the chunk's statistics (and top-k candidates) over the TP group
            allstats = all_gather_stats(stats, tp_group, world) if world > 1 else stats.unsqueeze(0)
            logp_sel[a:b], ent, M[a:b], S[a:b] = merge_ranks(allstats[..., :k_stats], valid[a:b], want_h)
            if want_h:
                ent_sel[a:b] = ent
            if topk:  # [R, rows, k'] candidates -> [rows, R k'] -> entropy of the top k
                cand = allstats[..., k_stats:].permute(1, 0, 2).reshape(b - a, -1)
                top_sel[a:b] = entropy_of_top_values(cand, topk)
        del tiles
        outs = [logp_sel, ent_sel, top_sel]
        if sel is not None:
            outs = [torch.zeros(n, **f32).index_copy_(0, sel, t) for t in outs]
        logp, ent, top = outs
        if not want_h:
            ctx.mark_non_differentiable(ent)
        ctx.mark_non_differentiable(top)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h_all, weight, sel, local_y, owned, valid, M, S, ent_sel)
        ctx.cfg = (tp_group, world, sequence_parallel, want_h, rows, block, hidden.shape[0])
        return logp, ent, top

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_top):
        h_all, weight, sel, local_y, owned, valid, M, S, ent = ctx.saved_tensors
        tp_group, world, sequence_parallel, want_h, rows, block, n_local = ctx.cfg
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 10
        g_ent = g_ent if want_h else None
        if (g_lp is None and g_ent is None) or not (need_dh or need_dw):
            return (None, None) + none

        def pick(g):
            return None if g is None else (g.float() if sel is None else g.float().index_select(0, sel))

        n_sel, vt = M.shape[0], weight.shape[0]
        coefs = _grad_coefficients(pick(g_lp), pick(g_ent), valid, owned, S, ent)
        rows, block = min(rows, max(n_sel, 1)), min(block, vt)
        dz = _DzTiles(_Tiles(h_all, weight, rows, block, entropy_buf=coefs[0] is not None), M, coefs, local_y, owned)
        dh_all = torch.zeros_like(h_all) if need_dh else None
        main_grad = _main_grad_of(weight) if need_dw else None
        # ONE full fp32 accumulator: of dW (row chunks outside) or of dh (vocabulary blocks
        # outside); none when dW goes straight into DDP's fp32 main_grad (row chunks outside)
        if main_grad is not None or (need_dh and (not need_dw or n_sel > vt)):
            dw = _backward_rows_outside(dz, h_all, weight, sel, n_sel, rows, block, dh_all, need_dw, main_grad)
        else:
            dw = _backward_vocab_outside(dz, h_all, weight, sel, n_sel, rows, block, dh_all, need_dw)
        del dz
        dh = _sum_hidden_grad(dh_all, n_local, tp_group, world, sequence_parallel) if need_dh else None
        return (dh, dw) + none


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------
def _rows_and_labels(hidden, labels, mask, rows_match_labels: bool):
    """The op's flat view: ``(rows [n_local, h], labels [n], selection or None, out_shape)``.

    ``[s, b, h]`` hidden states (megatron's layout; ``s/tp`` rows of it under SP) go with
    ``[b, s]`` labels: the rows are ``[s, b]`` flattened and the labels are transposed to match;
    the result is ``[b, s]``. Flat ``[n, h]`` rows only with ``rows_match_labels`` and ``[n]``
    labels: the op cannot know how the caller flattened them.
    """
    if hidden.dim() == 3:
        if labels.dim() != 2 or labels.shape[0] != hidden.shape[1]:
            raise ValueError(f"hidden [s, b, h] = {tuple(hidden.shape)} needs labels [b, s] with b = {hidden.shape[1]}, "
                             f"got {tuple(labels.shape)}")
        rows, flat_labels = hidden.reshape(-1, hidden.shape[2]), labels.t().reshape(-1)
        out_shape = (labels.shape[1], labels.shape[0])
    elif hidden.dim() == 2:
        if not rows_match_labels or labels.dim() != 1:
            raise ValueError(
                f"fused_linear_logprobs: flat hidden rows {tuple(hidden.shape)} with labels {tuple(labels.shape)}: the "
                "row order is unknown (GPTModel's rows are [s, b], labels are [b, s]); pass the hidden states as "
                "[s, b, h] with labels [b, s], or flat rows with 1-D labels and rows_match_labels=True if row i "
                "is labels[i]")
        rows, flat_labels, out_shape = hidden, labels, None
    else:
        raise ValueError(f"hidden must be [s, b, h] (or [n, h] rows), got {tuple(hidden.shape)}")
    if mask is None:
        return rows, flat_labels, None, out_shape
    selection = mask if isinstance(mask, RowSelection) else RowSelection(mask)
    if selection.shape != tuple(labels.shape):
        raise ValueError(f"mask shape {selection.shape} must equal labels shape {tuple(labels.shape)}")
    return rows, flat_labels, selection.indices(), out_shape


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
    mask=None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    vocab_block_size: Optional[int] = None,
    rows_match_labels: bool = False,
    topk_entropy: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Log-probability of ``labels`` (and the entropy) under ``hidden @ weight.T``, logits-free.

    (Over 60 lines only by this docstring: the argument contract is the op's public API.)

    Args:
        hidden: GPTModel's final hidden states ``[s, b, h]`` (fp32, bf16 or fp16), the layout
            megatron's output layer receives. Without sequence parallelism every TP rank passes
            the same tensor; with ``sequence_parallel=True`` rank ``r`` passes its sequence shard
            ``[s/tp, b, h]`` (positions ``[r*s/tp, (r+1)*s/tp)``), all-gathered over TP first.
            Flat rows ``[n, h]`` only with ``rows_match_labels=True`` (row ``i`` is ``labels[i]``).
        weight: ``[V/tp, h]`` this rank's vocabulary shard of the output layer (rank ``r`` owns
            ids ``[r*V/tp, (r+1)*V/tp)``), same dtype as ``hidden``; e.g. the tied embedding.
        labels: int ``[b, s]`` GLOBAL vocabulary ids (``[n]`` with flat rows); outside
            ``[0, V)`` = no target (log-prob 0, no gradient through it).
        tp_group: the tensor-parallel group; ``None``: megatron's when initialised, else none.
        sequence_parallel: ``hidden`` holds this rank's sequence shard (megatron's SP layout).
        mask: optional, the shape of ``labels`` (nonzero = computed), or a :class:`RowSelection`
            of it made earlier (before the model's forward: no wait on the device, see there).
            Rows with mask 0 are never projected: their log-prob and entropy are 0 and they get
            no gradient. Must be the same on every rank of the TP group.
        return_entropy: also return the entropy of the full distribution.
        chunk_size: rows per chunk (one TP exchange of statistics per chunk). ``None``: 512 on
            CPU, 1024 on accelerators.
        vocab_block_size: vocabulary entries per tile. ``None``: 512 on CPU, 8192 on
            accelerators.
        rows_match_labels: accept flat ``[n, h]`` rows with ``[n]`` labels, row ``i`` <-> label ``i``.
        topk_entropy: ``k``: also return the entropy of each row's renormalised top-``k``
            distribution (``ops.topk_entropy``; EAFT's gate), found by a running top-k over the
            tiles and exchanged with the statistics; no gradient.

    Returns:
        fp32 ``logp`` of the labels' shape (``[b, s]``; nats, ``<= 0``) or ``(logp, entropy)``,
        then the top-k entropy last when ``topk_entropy`` is given,
        equal within fp32 rounding to ``vocab_parallel_logprobs(logits, labels)`` on the output
        layer's logits, differentiable w.r.t. ``hidden`` and ``weight``; gradients are returned
        in their dtypes, accumulated in fp32.

    Communication: with SP, one all-gather of ``hidden`` forward and one reduce-scatter of its
    gradient backward; without SP (TP > 1), one all-reduce of the hidden gradient backward (as
    megatron's column-parallel output layer); one all-gather of ``[rows, 4]`` fp32 statistics
    (``[rows, 4 + min(k, V/tp)]`` with ``topk_entropy=k``) per chunk forward. The math is in ``docs/logprobs.md`` ("Fused output layer").
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [s, b, h] and weight [V/tp, h] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _SUPPORTED:
        raise TypeError(f"hidden and weight must share one dtype of fp32/bf16/fp16, got {hidden.dtype} "
                        f"and {weight.dtype}")
    if torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    for name, val in (("chunk_size", chunk_size), ("vocab_block_size", vocab_block_size)):
        if val is not None and (isinstance(val, bool) or int(val) <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {val}")
    rows_in, flat_labels, sel, out_shape = _rows_and_labels(hidden, labels, mask, rows_match_labels)
    group, rank, world = resolve_tp_group(tp_group)
    topk = 0 if topk_entropy is None else check_topk(topk_entropy, weight.shape[0] * world)
    rows, block = default_fused_tiles(hidden.device)
    rows, block = int(chunk_size or rows), int(vocab_block_size or block)
    outs = _FusedLinearLogprobs.apply(rows_in, weight, flat_labels.long(), sel, group, rank, world,
                                      bool(sequence_parallel and world > 1), bool(return_entropy), rows, block, topk)
    if out_shape is not None:  # [s, b] rows -> [b, s]
        outs = [t.view(out_shape).t().contiguous() for t in outs]
    logp, ent, top = outs
    picked = [logp] + ([ent] if return_entropy else []) + ([top] if topk else [])
    return picked[0] if len(picked) == 1 else tuple(picked)
