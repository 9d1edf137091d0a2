"""FP8 training settings: validation, NeMo's spellings, megatron-core fields, GPU requirements.

FP8 runs entirely on megatron-core's Transformer Engine path: this module only fills the
``TransformerConfig`` fields (``fp8``, ``fp8_recipe``, ``fp8_margin``, ``fp8_amax_history_len``,
``fp8_amax_compute_algo``, ``fp8_param``) and the DDP field ``fp8_param_gather``. megatron-core
then builds the TE layers (under TE's ``fp8_model_init`` when ``fp8_param``) and enters TE's
FP8 autocast around the decoder layers of every forward (``TransformerBlock`` via
``megatron.core.fp8_utils.get_fp8_context``). The embedding, the output layer (megatron's
``ColumnParallelLinear``, outside that region), the logits and the loss stay in bf16 / fp32.
What an FP8 forward-only pass (the old policy's) changes is documented in docs/fp8.md.

Two spellings are accepted in the run config (``model.*``):

- megatron-core / NeMo 2 / Megatron-Bridge: ``fp8: e4m3 | hybrid``, ``fp8_recipe``,
  ``fp8_margin``, ``fp8_amax_history_len``, ``fp8_amax_compute_algo``, ``fp8_param_gather``;
- NeMo 1 (``megatron_gpt_config.yaml``): ``fp8: true | false`` with ``fp8_e4m3`` or
  ``fp8_hybrid``, ``fp8_params`` (= ``fp8_param_gather``), ``fp8_interval`` (ignored by TE
  >= 1.8, accepted at 1 only) and ``reduce_amax`` (megatron-core always reduces amaxes,
  accepted at true only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
AMAX_COMPUTE_ALGOS = ("most_recent", "max")

#: the delayed-scaling knobs and their megatron-core defaults (they mean nothing to the
#: other recipes, which compute every scale from the tensor being cast)
_DELAYED_ONLY = {"fp8_margin": 0, "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent"}


@dataclass(frozen=True)
class FP8Config:
    """Resolved FP8 settings (``format`` None = FP8 off).

    Attributes:
        format: "e4m3" (every FP8 tensor e4m3) or "hybrid" (e4m3 forward, e5m2 gradients).
        recipe: "delayed" (scales from an amax history), "tensorwise" (current per-tensor
            scaling), "blockwise" (1x128 / 128x128 blocks, Hopper), "mxfp8" (Blackwell).
        margin: delayed scaling: scale = (fp8_max / amax) / 2**margin.
        amax_history_len: delayed scaling: amaxes kept per tensor (steps).
        amax_compute_algo: delayed scaling: "most_recent" or "max" over the history.
        param_gather: keep the TE layers' weights in FP8 and all-gather them in FP8 with the
            distributed optimizer (megatron's ``fp8_param`` + DDP ``fp8_param_gather``).
    """

    format: Optional[str] = None
    recipe: str = "delayed"
    margin: int = 0
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    param_gather: bool = False

    @property
    def enabled(self) -> bool:
        return self.format is not None

    @property
    def has_scaling_state(self) -> bool:
        """True for the delayed recipe: TE keeps per-module amax histories and scales that
        only a forward with autograd enabled updates (see docs/fp8.md)."""
        return self.enabled and self.recipe == "delayed"

    @property
    def align_size(self) -> int:
        """Tokens per rank must be a multiple of this for TE's FP8 GEMMs (1 when FP8 is off).

        megatron-core's ``get_fp8_align_size``: 32 for mxfp8, 16 otherwise.
        """
        if not self.enabled:
            return 1
        from megatron.core.enums import Fp8Recipe
        from megatron.core.fp8_utils import get_fp8_align_size

        return int(get_fp8_align_size(Fp8Recipe(self.recipe)))

    def transformer_config_fields(self) -> Dict[str, Any]:
        """megatron ``TransformerConfig`` fields ({} when FP8 is off)."""
        if not self.enabled:
            return {}
        return dict(fp8=self.format, fp8_recipe=self.recipe, fp8_margin=self.margin,
                    fp8_amax_history_len=self.amax_history_len, fp8_amax_compute_algo=self.amax_compute_algo,
                    fp8_param=self.param_gather)

    def ddp_config_fields(self) -> Dict[str, Any]:
        """megatron ``DistributedDataParallelConfig`` fields ({} when FP8 is off)."""
        return {"fp8_param_gather": self.param_gather} if self.enabled else {}

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        text = f"{self.format}, recipe {self.recipe}"
        if self.recipe == "delayed":
            text += (f" (margin {self.margin}, amax history {self.amax_history_len}, "
                     f"{self.amax_compute_algo})")
        return text + (", FP8 parameters" if self.param_gather else "")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_model_keys(cls, keys: Mapping[str, Any], prefix: str = "model.") -> "FP8Config":
        """Resolve the FP8 keys of a run config's ``model`` section (both spellings).

        Args:
            keys: the model section's values; absent keys take their defaults. Read: ``fp8``,
                ``fp8_e4m3``, ``fp8_hybrid``, ``fp8_recipe``, ``fp8_margin``,
                ``fp8_amax_history_len``, ``fp8_amax_compute_algo``, ``fp8_param_gather``,
                ``fp8_params``, ``fp8_interval``, ``reduce_amax``.
            prefix: prepended to key names in error messages.
        Raises:
            ValueError: naming the key (and the conflicting one) for any invalid value.
        """
        def name(key: str) -> str:
            return prefix + key

        fmt = _resolve_format(keys, name)
        recipe = keys.get("fp8_recipe") or "delayed"
        if recipe not in FP8_RECIPES:
            raise ValueError(f"{name('fp8_recipe')}={recipe!r} is not one of {', '.join(FP8_RECIPES)}")
        margin = _get_int(keys, "fp8_margin", 0, name, minimum=0)
        history = _get_int(keys, "fp8_amax_history_len", 1, name, minimum=1)
        algo = keys.get("fp8_amax_compute_algo") or "most_recent"
        if algo not in AMAX_COMPUTE_ALGOS:
            raise ValueError(f"{name('fp8_amax_compute_algo')}={algo!r} is not one of {', '.join(AMAX_COMPUTE_ALGOS)}")
        gather = _resolve_param_gather(keys, name)
        interval = _get_int(keys, "fp8_interval", 1, name, minimum=1)
        if interval != 1:
            raise ValueError(f"{name('fp8_interval')}={interval}: Transformer Engine >= 1.8 ignores it and "
                             "megatron-core marks it deprecated (scales are updated every step); remove it or set 1")
        if keys.get("reduce_amax") is False:
            raise ValueError(f"{name('reduce_amax')}=false is not supported: megatron-core always reduces FP8 "
                             "amaxes over its amax-reduction group (TP x CP x DP); remove the key or set true")
        if fmt is not None and recipe != "delayed":
            values = {"fp8_margin": margin, "fp8_amax_history_len": history, "fp8_amax_compute_algo": algo}
            for key, default in _DELAYED_ONLY.items():
                if values[key] != default:
                    raise ValueError(
                        f"{name(key)}={values[key]!r} applies to {name('fp8_recipe')}=delayed only (megatron-core "
                        f"passes it to TE's DelayedScaling); the {recipe} recipe computes every scale from the "
                        f"tensor being cast. Remove it or set {default!r}")
        return cls(format=fmt, recipe=recipe, margin=margin, amax_history_len=history, amax_compute_algo=algo,
                   param_gather=bool(gather) and fmt is not None)


def _get_int(keys: Mapping[str, Any], key: str, default: int, name, minimum: int) -> int:
    value = keys.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name(key)} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name(key)}={value} must be >= {minimum}")
    return value


def _resolve_format(keys: Mapping[str, Any], name) -> Optional[str]:
    """``fp8`` as megatron spells it (a format name) or as NeMo 1 does (a switch + flags)."""
    fp8 = keys.get("fp8")
    flags = {f: keys.get(f"fp8_{f}") for f in FP8_FORMATS}  # fp8_e4m3, fp8_hybrid
    for flag, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name('fp8_' + flag)} must be true or false, got {value!r}")
    chosen = [f for f, value in flags.items() if value]
    if fp8 is None or fp8 is False:
        return None  # NeMo configs carry fp8_hybrid: true with fp8: false; FP8 stays off
    if fp8 is True:
        if len(chosen) != 1:
            raise ValueError(
                f"{name('fp8')}=true (NeMo's spelling) needs exactly one of {name('fp8_e4m3')}=true or "
                f"{name('fp8_hybrid')}=true, got " + (", ".join(f"fp8_{f}=true" for f in chosen) or "neither")
                + f"; or set {name('fp8')} to e4m3 or hybrid")
        return chosen[0]
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"{name('fp8')}={fp8!r} is not one of {', '.join(FP8_FORMATS)} "
                         f"(or true with {name('fp8_e4m3')} / {name('fp8_hybrid')}, NeMo's spelling)")
    other = [f for f in chosen if f != fp8]
    if other:
        raise ValueError(f"{name('fp8')}={fp8} conflicts with {name('fp8_' + other[0])}=true")
    return fp8


def _resolve_param_gather(keys: Mapping[str, Any], name) -> bool:
    ours, nemo = keys.get("fp8_param_gather"), keys.get("fp8_params")
    for key, value in (("fp8_param_gather", ours), ("fp8_params", nemo)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name(key)} must be true or false, got {value!r}")
    if ours is not None and nemo is not None and ours != nemo:
        raise ValueError(f"{name('fp8_param_gather')}={str(ours).lower()} conflicts with its NeMo spelling "
                         f"{name('fp8_params')}={str(nemo).lower()}")
    return bool(ours if ours is not None else nemo)


# ---------------------------------------------------------------------- hardware
#: recipe -> (minimum compute capability, maximum (exclusive) or None, minimum CUDA, what it is)
#: as Transformer Engine checks them (``transformer_engine.pytorch`` ``check_*_support``)
_REQUIREMENTS = {
    "delayed": ((8, 9), None, None, "FP8 (Ada, Hopper, Blackwell)"),
    "tensorwise": ((8, 9), None, None, "FP8 (Ada, Hopper, Blackwell)"),
    "blockwise": ((9, 0), None, (12, 9), "FP8 block scaling (Hopper or newer, CUDA >= 12.9)"),
    "mxfp8": ((10, 0), (12, 0), None, "MXFP8 (Blackwell data-center GPUs, compute capability 10.x-11.x)"),
}


def fp8_hardware_problem(fp8: FP8Config, capability: Optional[Tuple[int, int]], cuda_version: Optional[str],
                         device_name: str = "this GPU") -> Optional[str]:
    """Why this GPU cannot run ``fp8`` (None if it can, or if FP8 is off).

    Args:
        capability: (major, minor) compute capability, None without a CUDA device.
        cuda_version: ``torch.version.cuda`` ("12.4"), None for a CPU build.
    """
    if not fp8.enabled:
        return None
    low, high, min_cuda, what = _REQUIREMENTS[fp8.recipe]
    need = f"model.fp8_recipe={fp8.recipe} needs {what}: an NVIDIA GPU of compute capability >= {low[0]}.{low[1]}"
    if high:
        need += f" and < {high[0]}.{high[1]}"
    if capability is None:
        return f"{need}; this machine has no CUDA device (FP8 runs through Transformer Engine on GPUs only)"
    cuda = tuple(int(p) for p in (cuda_version or "0.0").split(".")[:2])
    have = f"{device_name} has compute capability {capability[0]}.{capability[1]}, CUDA {cuda_version}"
    if tuple(capability) < low or (high and tuple(capability) >= high):
        return f"{need}; {have}"
    if min_cuda and cuda < min_cuda:
        return f"{need} and CUDA >= {min_cuda[0]}.{min_cuda[1]}; {have}"
    if fp8.recipe in ("delayed", "tensorwise") and tuple(capability) < (9, 0) and cuda < (12, 1):
        return f"{need}, and CUDA >= 12.1 on Ada (8.9); {have}"
    return None


def check_fp8_hardware(fp8: FP8Config) -> None:
    """Raise RuntimeError naming the requirement if this machine's GPU cannot run ``fp8``."""
    import torch

    capability = name = None
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
    problem = fp8_hardware_problem(fp8, capability, torch.version.cuda, name or "this GPU")
    if problem:
        raise RuntimeError(problem)
