"""The trainer's data plan: the data keys checked before distributed start, the training
sampler (epochs, or weighted mixing), the validation pass, and the data lines of the log.

``load_data_settings(cfg, world_size)`` runs before torch.distributed starts and raises a
:class:`psft_megatron.errors.ConfigError` naming the key for every bad data setting: unknown
keys (with the closest valid one), wrong types and ranges, NeMo batch-size copies that differ
from the model's, a validation batch that does not fit the data-parallel layout, validation
asked for without a validation set. A ``cache_dir`` left unset becomes
``<run dir>/token_cache`` (:func:`default_cache_dir`). After the datasets are built (still
before the first step) :meth:`DataSettings.train_sampler` and
:meth:`DataSettings.validation_sampler` size them: a set too small for what is configured is a
:class:`DataError` naming the key.

Validation (``trainer.val_check_interval``, ``trainer.limit_val_batches``) is a pass over the
validation set in a fixed order: each sample at most once, the last partial global batch
evaluated exactly (filler rows carry no loss token, so the NLL and entropy are token means
over exactly the evaluated samples), or left out with ``validation_ds.drop_last``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from psft_megatron.data.config import DataConfig, TokenizerConfig
from psft_megatron.data.errors import ConfigError, DataError
from psft_megatron.data.mixing import MixtureSampler
from psft_megatron.data.sampler import EvalSampler, SFTSampler


@dataclass
class DataSettings:
    """Validated data settings of a run (see :func:`load_data_settings`).

    ``seed``: the training order's seed (``train_ds.seed``, else ``model.seed``);
    ``val_global_batch_size`` / ``val_micro_batch_size``: validation batches (items);
    ``notes``: lines for the start-up log (ignored NeMo keys, a validation set never used).
    """

    tokenizer: TokenizerConfig
    train: DataConfig
    validation: Optional[DataConfig]
    seed: int
    val_seed: int
    global_batch_size: int
    micro_batch_size: int
    val_global_batch_size: int
    val_micro_batch_size: int
    limit_val_batches: int
    notes: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ samplers
    def train_sampler(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int):
        """The training sampler over ``dataset``'s items: :class:`MixtureSampler` with
        ``concat_sampling_probabilities``, else epochs (:class:`SFTSampler`) with the
        configured seed, shuffle and drop_last. A set smaller than one global batch with
        ``drop_last`` is a DataError naming the keys."""
        cfg, g = self.train, self.global_batch_size
        if cfg.mixing:
            return MixtureSampler([dataset.source_items(k) for k in range(len(cfg.file_names))],
                                  cfg.concat_sampling_probabilities, g, micro_batch_size, dp_rank, dp_size,
                                  seed=self.seed, shuffle=bool(cfg.shuffle))
        n = len(dataset)
        if n < g and cfg.drop_last:
            raise DataError(f"{cfg.prefix}: {n} {_unit(dataset)} (after the length policy) are fewer than one global "
                            f"batch (model.global_batch_size={g}); lower model.global_batch_size, add data, or set "
                            f"{cfg.prefix}.drop_last=false (the batch is then filled up by repeating {_unit(dataset)})")
        return SFTSampler(n, g, micro_batch_size, dp_rank, dp_size, seed=self.seed, shuffle=bool(cfg.shuffle),
                          drop_last=bool(cfg.drop_last))

    def validation_sampler(self, dataset, dp_rank: int, dp_size: int) -> Optional[EvalSampler]:
        """The validation pass over ``dataset`` (None without a validation set). A set that
        would evaluate nothing is a DataError naming the keys."""
        if dataset is None or self.validation is None:
            return None
        cfg, g = self.validation, self.val_global_batch_size
        sampler = EvalSampler(len(dataset), g, dataset.micro_batch_size(self.val_micro_batch_size), dp_rank, dp_size,
                              seed=self.val_seed, shuffle=bool(cfg.shuffle), drop_last=bool(cfg.drop_last),
                              limit_batches=self.limit_val_batches)
        if sampler.num_batches == 0:
            raise DataError(f"{cfg.prefix}: {len(dataset)} {_unit(dataset)} (after the length policy) are fewer than "
                            f"one validation batch of {g} and {cfg.prefix}.drop_last=true, so nothing would be "
                            f"evaluated; set {cfg.prefix}.drop_last=false (the partial batch is evaluated exactly) or "
                            f"lower {cfg.prefix}.global_batch_size")
        return sampler

    # ------------------------------------------------------------------ log
    def plan_lines(self, train_set, sampler, max_steps: int, val_set=None, val_sampler=None,
                   val_check_interval: int = 0) -> List[str]:
        """What the data will do, for the start-up log: epochs or mixing, the partial batches,
        the validation pass."""
        lines = list(self.notes)
        unit, g = _unit(train_set), self.global_batch_size
        cfg = self.train
        order = f"reshuffled every epoch (seed {self.seed})" if cfg.shuffle else "in file order"
        if isinstance(sampler, MixtureSampler):
            shares = ", ".join(f"{path} p={p:g} ({len(items)} {unit})" for path, p, items in
                               zip(cfg.file_names, sampler.probabilities, sampler.source_items))
            passes = ", ".join(f"{max_steps * g * p / len(items):.2f}" for p, items in
                               zip(sampler.probabilities, sampler.source_items))
            lines.append(f"train data: mixing {shares}; each global batch of {g} holds every file's share (to about "
                         f"one item), each file {order.replace('every epoch', 'after each pass')} on its own; no epochs, "
                         f"no partial batches; trainer.max_steps={max_steps} makes {passes} passes over the files")
        else:
            tail = len(train_set) % g
            if tail == 0:
                partial = "no partial batch"
            elif sampler.drop_last:
                partial = (f"the last partial batch ({tail} {unit}) is left out every epoch (drop_last=true; "
                           f"{'different ones each epoch' if cfg.shuffle else 'the same ones each epoch'})")
            else:
                partial = (f"the last partial batch ({tail} {unit}) is filled up with {sampler.repeated_per_epoch} "
                           "from the start of the same epoch's order (drop_last=false)")
            lines.append(f"train data: {len(train_set)} {unit} per epoch, {sampler.steps_per_epoch} steps of {g}, "
                         f"{order}; {partial}; trainer.max_steps={max_steps} = "
                         f"{max_steps / sampler.steps_per_epoch:.2f} epochs")
        if val_sampler is not None:
            vcfg, vg, vunit = self.validation, val_sampler.global_batch_size, _unit(val_set)
            what = f"validation data: {val_sampler.num_items} {vunit} in {val_sampler.available_batches} batches of {vg}"
            tail = val_sampler.num_items % vg
            if val_sampler.dropped:
                what += f"; the last {val_sampler.dropped} left out ({vcfg.prefix}.drop_last=true)"
            elif tail:
                what += f" (the last holds {tail}, evaluated exactly)"
            if val_sampler.not_evaluated:
                what += (f"; trainer.limit_val_batches={self.limit_val_batches}: the first {val_sampler.evaluated} "
                         f"{'(a fixed shuffled order)' if vcfg.shuffle else ''} each validation, "
                         f"{val_sampler.not_evaluated} never evaluated").replace("  ", " ")
            else:
                what += "; each validation evaluates all of them once"
                if self.limit_val_batches > val_sampler.available_batches:
                    what += f" (trainer.limit_val_batches={self.limit_val_batches} > {val_sampler.available_batches})"
            if not val_check_interval:
                what += "; trainer.val_check_interval=0: never run"
            lines.append(what)
        return lines


def _unit(dataset) -> str:
    return "packed rows" if getattr(dataset, "rows", None) is not None else "samples"


def default_cache_dir(cfg) -> str:
    """``<run dir>/token_cache``: where a run keeps its token caches when ``cache_dir`` is not
    set, so a restart (or a resume) of the run memory-maps them instead of tokenising again."""
    from psft_megatron.training.trainer import log_dir_of

    return os.path.join(log_dir_of(cfg), "token_cache")


def load_data_settings(cfg, world_size: int) -> DataSettings:
    """Parse and check the data keys of a :class:`psft_megatron.config.schema.RunConfig` for a
    world of ``world_size`` processes (before torch.distributed starts)."""
    m, trainer = cfg.model, cfg.trainer
    tok = TokenizerConfig.from_dict(m.tokenizer)
    train = DataConfig.from_dict(m.data.train_ds, prefix="model.data.train_ds")
    val = (DataConfig.from_dict(m.data.validation_ds, prefix="model.data.validation_ds")
           if m.data.validation_ds is not None else None)
    for data in (train, val):
        if data is not None and not data.cache_dir:
            data.cache_dir = default_cache_dir(cfg)
    for key in ("global_batch_size", "micro_batch_size"):
        value = getattr(train, key)
        if value is not None and value != getattr(m, key):
            raise ConfigError(f"model.data.train_ds.{key}: {value} differs from model.{key}={getattr(m, key)}, which "
                              f"training uses; make them equal (NeMo writes ${{model.{key}}})")
    model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
    dp = world_size // model_parallel if model_parallel > 0 and world_size % model_parallel == 0 else 0
    val_g = (val.global_batch_size if val is not None and val.global_batch_size else m.global_batch_size)
    val_mb = (val.micro_batch_size if val is not None and val.micro_batch_size else m.micro_batch_size)
    if val is not None and dp and val_mb > 0 and val_g % (val_mb * dp):  # (a bad layout: check_layout says so)
        # name the keys the values came from: the validation set's own, or the model's it inherits
        g_key = ("model.data.validation_ds.global_batch_size" if val.global_batch_size else
                 "model.global_batch_size (the validation batch too: model.data.validation_ds.global_batch_size "
                 "is not set)")
        mb_key = ("model.data.validation_ds.micro_batch_size" if val.micro_batch_size else "model.micro_batch_size")
        raise ConfigError(f"{g_key}: {val_g} is not divisible by {mb_key} * data-parallel size = {val_mb}*{dp}")
    if trainer.val_check_interval < 0:
        raise ConfigError(f"trainer.val_check_interval: must be >= 0 (0: never validate), got "
                          f"{trainer.val_check_interval}")
    if trainer.val_check_interval and val is None:
        raise ConfigError(f"trainer.val_check_interval: {trainer.val_check_interval} asks for validation, but "
                          "model.data.validation_ds is not set; set it or use trainer.val_check_interval=0")
    if val is not None and trainer.limit_val_batches < 1:
        raise ConfigError(f"trainer.limit_val_batches: must be >= 1 (global batches per validation, never more than "
                          f"the set holds), got {trainer.limit_val_batches}")
    ignored = list(train.ignored_keys) + (list(val.ignored_keys) if val is not None else [])
    if getattr(m.data, "test_ds", None) is not None:
        ignored.append("model.data.test_ds")
    notes = []
    if ignored:
        notes.append(f"WARNING: NeMo data keys with no effect here, ignored: {', '.join(ignored)}")
    seed = train.seed if train.seed is not None else m.seed
    val_seed = val.seed if val is not None and val.seed is not None else m.seed
    return DataSettings(tokenizer=tok, train=train, validation=val, seed=seed, val_seed=val_seed,
                        global_batch_size=m.global_batch_size, micro_batch_size=m.micro_batch_size,
                        val_global_batch_size=val_g, val_micro_batch_size=val_mb,
                        limit_val_batches=trainer.limit_val_batches, notes=notes)
