"""MoE training metrics per optimizer step: the routers' aux loss (and z-loss) and the expert
load of every MoE layer.

- ``moe_aux_loss`` (and ``moe_z_loss`` when the z-loss is on): the loss before its coefficient,
  as megatron computes and records it per layer and micro-batch
  (:func:`psft_megatron.compat.releases.moe_router_losses`), averaged over the micro-batches
  of the step, the data-parallel replicas and the MoE layers;
- ``moe_load_max_mean`` and ``moe_load_max_mean/layer_N`` (N: 0-based global layer index):
  tokens routed to the busiest expert over the mean per expert (1.0 is perfect balance, k*E/k
  = E when every token goes to the same k experts), counted over the step's training
  forwards on all ranks;
- ``moe_tokens_per_expert``: mean routed tokens per expert and layer (tokens x top-k / E).

Token counts come from forward hooks on megatron's routers (the ``routing_map`` [tokens, E]
they return), added up on the device: only forwards in training mode with gradients count, so
the old-policy, reference and validation passes do not. Everything reduces in one all-reduce
over the world on :func:`psft_megatron.distributed.runtime.device`, and the per-layer ratios and
means are computed there: the step reads its results to the host once (no host sync per layer).
"""

from __future__ import annotations

from typing import Dict, List

import torch

#: megatron's name of the recorded aux loss per ``model.moe_aux_loss_type``
_AUX_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
              "global_aux_loss": "global_load_balancing_loss"}


class MoEMetrics:
    """Collects the MoE metrics of the model ``chunks`` (this rank's, possibly DDP-wrapped).

    Args:
        chunks: model chunks; their ``TopKRouter`` modules are hooked.
        config: megatron ``TransformerConfig`` (layers, experts, aux-loss type).
    """

    def __init__(self, chunks: List, config):
        from megatron.core.transformer.moe.router import TopKRouter

        from psft_megatron.model.unwrap import unwrap
        from psft_megatron.distributed.runtime import device

        self.config = config
        self.num_layers = config.num_layers
        self.num_experts = config.num_moe_experts
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device())
        self._hooks = []
        # megatron's tracker is process-wide: what earlier MoE forwards in this process recorded
        # (another model, a probe) is not this run's first step
        from psft_megatron.compat.releases import clear_moe_router_losses

        clear_moe_router_losses()
        for chunk in chunks:
            for module in unwrap(chunk).modules():
                if isinstance(module, TopKRouter):
                    self._hooks.append(module.register_forward_hook(self._count))

    def _count(self, router, inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        routing_map = output[1]  # [tokens, E] bool
        self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to(self.counts.dtype)

    def step_metrics(self, num_microbatches: int) -> Dict[str, float]:
        """The step's metrics (same on every rank; collective), then everything reset. Reduced
        on the device; ONE device-to-host read per step, whatever the number of layers."""
        from megatron.core import parallel_state

        from psft_megatron.compat.releases import moe_router_losses
        from psft_megatron.distributed.runtime import device

        losses = moe_router_losses()
        wanted = [("moe_aux_loss", _AUX_NAMES.get(self.config.moe_router_load_balancing_type))]
        if self.config.moe_z_loss_coeff:
            wanted.append(("moe_z_loss", "z_loss"))
        rows, summed = [], []
        for _, name in wanted:
            values, over_group = losses.get(name, (None, True))
            rows.append(values.detach().to(device(), torch.float64) if values is not None
                        else torch.zeros(self.num_layers, dtype=torch.float64, device=device()))
            summed.append(over_group)
        flat = torch.cat([self.counts.flatten()] + rows)
        torch.distributed.all_reduce(flat)
        world = torch.distributed.get_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        tp_cp = parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_context_parallel_world_size()
        replicas = world // pp  # ranks holding one layer
        # a value summed over TP x CP: one per DP replica; else one per rank
        divisors = [(replicas // tp_cp if over_group else replicas) * max(num_microbatches, 1) for over_group in summed]
        counts = flat[: self.counts.numel()].view_as(self.counts)  # [L, E] tokens routed, all ranks
        losses_per_layer = flat[self.counts.numel():].view(len(wanted), -1) / torch.tensor(
            divisors, dtype=flat.dtype, device=flat.device)[:, None]
        routed = counts.sum(dim=1)
        busiest = counts.max(dim=1).values / counts.mean(dim=1)  # NaN where a layer routed nothing (not MoE here)
        host = torch.cat([routed, busiest, losses_per_layer.flatten()]).tolist()  # the step's one host read
        return self._finish(wanted, host)

    def _finish(self, wanted, host) -> Dict[str, float]:
        """The metrics from the host copy of [routed tokens [L], busiest/mean [L], losses
        [len(wanted), L]]; the counts and megatron's loss records reset."""
        from psft_megatron.compat.releases import clear_moe_router_losses

        n = self.num_layers
        routed, busiest = host[:n], host[n: 2 * n]
        moe_layers = [i for i in range(n) if routed[i] > 0]
        out: Dict[str, float] = {}
        for k, (key, _) in enumerate(wanted):
            per_layer = host[(2 + k) * n: (3 + k) * n]
            if moe_layers:
                out[key] = sum(per_layer[i] for i in moe_layers) / len(moe_layers)
        for i in moe_layers:
            out[f"moe_load_max_mean/layer_{i}"] = busiest[i]
        if moe_layers:
            out["moe_load_max_mean"] = max(busiest[i] for i in moe_layers)
            out["moe_tokens_per_expert"] = sum(routed[i] for i in moe_layers) / (len(moe_layers) * self.num_experts)
        self.counts.zero_()
        clear_moe_router_losses()
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
