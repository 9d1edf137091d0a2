"""The model-parallel layout, without torch: :class:`ParallelConfig`.

It is the one declaration of the layout's fields: the run config's ``model.*`` layout keys
(:mod:`psft_megatron.config.schema`) are made from them, and the trainer builds the layout from
the config by keyword (:meth:`ParallelConfig.from_section`). :mod:`psft_megatron.distributed.runtime`
brings the layout up (``initialize``) and re-exports the class.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, List, Optional, Tuple


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is what is left of the world size.

    Attributes:
        tensor_model_parallel_size: TP, splits attention heads, MLP and vocab.
        pipeline_model_parallel_size: PP, splits the layers into stages.
        virtual_pipeline_model_parallel_size: model chunks per pipeline rank (interleaved
            1F1B); None for no virtual stages.
        context_parallel_size: CP, splits every sequence (load-balanced, 2*CP chunks).
        sequence_parallel: SP, shards activations outside TP regions along the sequence.
            Only with TP > 1: at TP = 1 it is turned off, as Megatron-LM's arguments and
            megatron-core's parallel linear layers do (:meth:`from_section` says so).
        expert_model_parallel_size: EP, splits the experts of MoE layers over ranks (a grid of
            its own: ETP * EP * PP must divide the world; the rest is expert data parallelism).
        expert_tensor_parallel_size: ETP, splits each expert's MLP; None means ETP = TP.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            object.__setattr__(self, "sequence_parallel", False)

    @classmethod
    def from_section(cls, section: Any, warn: Optional[Callable[[str], None]] = None) -> "ParallelConfig":
        """The layout of a config section (``cfg.model``) that has every field of this class as
        an attribute, copied by keyword field by field: a field cannot be forgotten or swapped.

        ``warn`` gets one line for a setting megatron would ignore (``sequence_parallel`` at
        ``tensor_model_parallel_size`` 1)."""
        parallel = cls(**{f.name: getattr(section, f.name) for f in fields(cls)})
        if warn is not None and section.sequence_parallel and not parallel.sequence_parallel:
            warn("WARNING: model.sequence_parallel=true needs model.tensor_model_parallel_size > 1; "
                 "sequence parallelism is off (as Megatron-LM turns it off at TP=1)")
        return parallel

    @classmethod
    def section_fields(cls) -> List[Tuple[str, Any, Any]]:
        """``(name, type, dataclasses.field(default=...))`` of every field: the config schema's
        ``model.*`` layout keys are made from these (``dataclasses.make_dataclass``), so the
        fields are declared once, here."""
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name], field(default=f.default)) for f in fields(cls)]

    @property
    def expert_tensor_size(self) -> int:
        """ETP as megatron resolves it (None -> TP)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def describe(self) -> str:
        parts = [
            f"TP={self.tensor_model_parallel_size}",
            f"PP={self.pipeline_model_parallel_size}",
        ]
        if self.virtual_pipeline_model_parallel_size:
            parts.append(f"VPP={self.virtual_pipeline_model_parallel_size}")
        parts.append(f"CP={self.context_parallel_size}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.expert_model_parallel_size > 1 or self.expert_tensor_size != self.tensor_model_parallel_size:
            parts.append(f"EP={self.expert_model_parallel_size}")
            parts.append(f"ETP={self.expert_tensor_size}")
        return "+".join(parts)

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the offending field if the layout does not fit ``world_size``."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            raise ValueError(
                "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size "
                f">= 2 and a value >= 1 (got VPP={vpp}, PP={self.pipeline_model_parallel_size})"
            )
        if world_size % self.model_parallel_size != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_model_parallel_size}*{self.pipeline_model_parallel_size}*"
                f"{self.context_parallel_size} = {self.model_parallel_size}"
            )
        for name in ("expert_model_parallel_size", "expert_tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {value}")
        expert_grid = self.expert_tensor_size * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % expert_grid:
            raise ValueError(
                f"world size {world_size} is not divisible by ETP*EP*PP = {self.expert_tensor_size}*"
                f"{self.expert_model_parallel_size}*{self.pipeline_model_parallel_size} = {expert_grid}"
            )
