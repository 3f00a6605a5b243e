"""Training on Ray Train: the driver (`driver`) runs a `TorchTrainer` whose workers run `worker`'s loop over a data-parallel strategy (`strategies`) and the loss module (`loss`)."""
