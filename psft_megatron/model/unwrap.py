"""The GPTModel inside megatron-core's wrappers."""


def unwrap(module):
    """The innermost module of ``module``: megatron wraps a GPTModel in DDP and Float16Module
    (each keeps the wrapped one as ``.module``); any such chain is followed to its end."""
    while hasattr(module, "module"):
        module = module.module
    return module
