"""Step timing that is true on GPUs, parameter counts for MFU, and the throughput metrics.

- :func:`start_timer` -> :class:`Interval`: on CUDA a pair of CUDA events recorded on the
  current stream around the work, so the time is what the GPU took (kernels are asynchronous:
  a host clock around them measures their launch). :meth:`Interval.seconds` waits for the end
  event only when read (after the step, whose metrics read the device anyway). On CPU the host
  clock (``time.perf_counter``) is exact.
- :func:`count_parameters` -> :class:`ParameterCounts`: all parameters, and the ACTIVE ones a
  token passes through: dense parts, routers and shared experts in full, routed experts at
  ``top-k / num_experts`` (MoE).
- :func:`throughput_metrics`: ``step_time_s``, ``forward_only_s``, ``tokens_per_s``,
  ``peak_mem_gib`` and ``mfu`` (GPUs with a known peak) of one step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

#: dense bf16 peak FLOP/s by GPU name fragment (for the MFU estimate; unknown GPUs get none)
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}
#: routed experts' parameters have this in their names (SequentialMLP ``mlp.experts.local_experts.N``,
#: TEGroupedMLP ``mlp.experts.linear_fc1.weightN``, GroupedMLP ``mlp.experts.weight1``); shared
#: experts live under ``mlp.shared_experts.`` and are dense
ROUTED_EXPERTS = ".mlp.experts."


def gpu_peak_flops(name: str) -> Optional[float]:
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


class Interval:
    """Elapsed time of the work issued between :func:`start_timer` and :meth:`stop`."""

    def __init__(self):
        from psft_megatron.distributed.runtime import device

        self.cuda = device().type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        self._t1: Optional[float] = None

    def stop(self) -> "Interval":
        if self.cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()
        return self

    def seconds(self) -> float:
        """Seconds between start and stop (on CUDA: waits for the end event first)."""
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._t1 - self._t0


def start_timer() -> Interval:
    """An :class:`Interval` started now (CUDA events on a GPU, the host clock on CPU)."""
    return Interval()


@dataclass(frozen=True)
class ParameterCounts:
    """``total``: every parameter once (TP/PP/EP shards summed, replicas not); ``active``: the
    parameters one token's forward pass uses (routed experts at top-k / E)."""

    total: int
    active: int


def local_parameter_counts(chunks, count_dense: bool, count_experts: bool) -> Dict[str, int]:
    """This rank's ``dense`` and routed-``experts`` parameter elements of ``chunks``, each only
    where the caller says this rank's copy is the one to count."""
    from psft_megatron.model.unwrap import unwrap

    out = {"dense": 0, "experts": 0}
    for chunk in chunks:
        for name, p in unwrap(chunk).named_parameters():
            expert = ROUTED_EXPERTS in f".{name}"
            if (count_experts if expert else count_dense):
                out["experts" if expert else "dense"] += p.numel()
    return out


def count_parameters(chunks, num_experts: Optional[int], topk: Optional[int]) -> ParameterCounts:
    """Total and active parameters of the model over all ranks (collective).

    Dense parameters are counted on data-parallel and context-parallel rank 0 (one copy of
    each TP/PP shard), routed experts on expert-data-parallel rank 0 (one copy of each
    ETP/EP/PP shard: with EP the experts live on ranks of different DP ranks).
    """
    from megatron.core import parallel_state

    from psft_megatron.distributed.runtime import all_reduce_values

    dense_owner = (parallel_state.get_data_parallel_rank() == 0
                   and parallel_state.get_context_parallel_rank() == 0)
    expert_owner = bool(num_experts) and parallel_state.get_expert_data_parallel_rank() == 0
    local = local_parameter_counts(chunks, dense_owner, expert_owner)
    dense, experts = (int(v) for v in all_reduce_values([local["dense"], local["experts"]]))
    share = topk / num_experts if num_experts and topk else 1.0
    return ParameterCounts(total=dense + experts, active=int(round(dense + experts * share)))


def throughput_metrics(step_s: float, forward_only_s: float, positions: float, active_parameters: int,
                       world_size: int) -> Dict[str, float]:
    """Per-step time, throughput, peak memory and MFU, counting everything the step cost.

    - ``step_time_s``: forward + backward + optimizer; ``forward_only_s``: this batch's
      old-policy pass (PSFT) or reference pass (SFT-KL), 0 for the first batch of a window;
      both GPU time on CUDA (events, :class:`Interval`);
    - ``tokens_per_s``: positions trained (all positions of the global batch) per second of
      ``step_time_s + forward_only_s``, so PSFT's overhead shows;
    - ``peak_mem_gib``: CUDA allocator peak on GPU, peak RSS of this process on CPU;
    - ``mfu`` (GPUs with a known peak): (6 N positions + 2 N positions of the forward-only
      pass) / (time x GPUs x peak bf16 dense FLOP/s), N = ACTIVE parameters (MoE: routed
      experts at top-k / E); the usual estimate, attention FLOPs not counted.
    """
    total = step_s + forward_only_s
    out = {"step_time_s": step_s, "forward_only_s": forward_only_s, "tokens_per_s": positions / max(total, 1e-9)}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = gpu_peak_flops(torch.cuda.get_device_name())
        if peak and total > 0:
            flops = active_parameters * positions * (6.0 + (2.0 if forward_only_s > 0 else 0.0))
            out["mfu"] = flops / (total * world_size * peak)
    else:
        import resource

        out["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out
