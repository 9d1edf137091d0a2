"""Processes and groups: :mod:`~psft_megatron.distributed.runtime` brings up torch.distributed
and megatron's ``parallel_state`` (NCCL on GPUs, gloo on CPUs) and owns the device rule;
:mod:`~psft_megatron.distributed.groups` resolves the process groups the ops take."""
