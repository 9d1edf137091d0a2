"""PSFT / SFT / DFT / SFT-KL fine-tuning on Megatron-Core.

    torchrun --nproc_per_node 2 pretrain_psft.py --config-path configs --config-name tiny_cpu \
        model.psft.clip_eps_high=0.2 trainer.max_steps=50

Config: NeMo-style YAML composed by Hydra (``--config-path``, ``--config-name``, dotted
overrides); every key is in docs/config.md. Unknown keys are errors.

Exit status: 0 when the run ends (``trainer.max_steps`` reached, or stopped by SIGTERM/SIGUSR1
after saving a checkpoint, or resumed at or past ``trainer.max_steps``: nothing to train); 2 for a bad config, data or checkpoint, reported as one line
(``config error: KEY: ...``, ``data error: FILE:line N: ...``, ``checkpoint error: PATH: ...``)
by global rank 0, without a traceback on any rank.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-path", default="configs", help="directory of the YAML configs")
    parser.add_argument("--config-name", required=True, help="config file name (without .yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.optim.lr=1e-6")
    return parser.parse_args(argv)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args) -> int:
    """Load the config, set up, train, save; raises :class:`psft_megatron.errors.UserError`."""
    from psft_megatron.config import load_run_config
    from psft_megatron.compat.quiet_imports import quiet_megatron_import

    cfg, resolved = load_run_config(args.config_path, args.config_name, args.overrides)
    quiet_megatron_import(announce=_is_rank0())
    from psft_megatron.training.trainer import Trainer

    trainer = Trainer(cfg, resolved)
    try:
        trainer.setup()
        if trainer.nothing_to_do:  # resumed at or past trainer.max_steps: nothing trained, nothing written
            if trainer.is_rank0:
                print(trainer.nothing_to_do, flush=True)
            return 0
        trainer.train()
        if trainer.preempted:
            return 0
        # every rank knows what this process saved (saves are collective): no file is read here
        save = cfg.exp_manager.checkpoint_callback_params.save_last
        path = trainer.save() if save else trainer.checkpoints.latest_path
        if trainer.is_rank0:
            print(f"done: {trainer.step} steps; logs in {trainer.log_dir}"
                  + (f"; checkpoint {path}" if path else ""), flush=True)
    finally:
        trainer.close()
        from psft_megatron.distributed.runtime import shutdown

        shutdown()
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from psft_megatron.errors import UserError

    try:
        return run(args)
    except UserError as exc:  # raised alike on every rank; one line from global rank 0
        if _is_rank0():
            print(exc.line(), file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
