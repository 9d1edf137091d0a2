"""Training loop pieces on top of megatron-core (model/optimizer set-up, one optimizer step)."""
