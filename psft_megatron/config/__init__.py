"""Run configuration: NeMo-style YAML (Hydra/OmegaConf) -> validated dataclasses."""

from psft_megatron.config.loader import ConfigError, build_run_config, check_layout, check_paths, check_requirements, load_run_config
from psft_megatron.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "build_run_config", "check_layout", "check_paths", "check_requirements", "load_run_config"]
