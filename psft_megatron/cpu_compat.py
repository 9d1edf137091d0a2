"""Deprecated path of :mod:`psft_megatron.compat.cpu` (kept for one release)."""

from psft_megatron._moved import alias

alias(__name__, "psft_megatron.compat.cpu")
