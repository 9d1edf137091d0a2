"""One process (world of one): train the tiny config, optionally dying by SIGKILL in the
middle of a checkpoint save (after the files are written, before the rename)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--kill-during-save", action="store_true")
    args = parser.parse_args()
    os.chdir(REPO)
    from psft_megatron.checkpointing import manager
    from psft_megatron.config import load_run_config
    from psft_megatron.training.trainer import Trainer

    if args.kill_during_save:
        def die(tmp, final, name):  # the temporary checkpoint is on disk; the rename never happens
            os.kill(os.getpid(), signal.SIGKILL)

        manager._publish = die
    cfg, raw = load_run_config("configs", "tiny_cpu", [
        f"trainer.max_steps={args.max_steps}", "trainer.val_check_interval=0", "trainer.devices=null",
        "trainer.progress_bar=false", "model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
        f"exp_manager.explicit_log_dir={args.log_dir}", "exp_manager.resume_if_exists=true",
        "exp_manager.create_tensorboard_logger=false", "exp_manager.checkpoint_callback_params.every_n_train_steps=2"])
    trainer = Trainer(cfg, raw)
    trainer.setup()
    trainer.train()
    trainer.save()
    trainer.close()  # waits for the rotation's deletions
    print(f"saved at step {trainer.step}", flush=True)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
