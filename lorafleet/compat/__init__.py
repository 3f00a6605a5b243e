"""Every place lorafleet reaches into a third-party library's internals, one module per library.

- [`lorafleet.compat.peft`]: the aLoRA activation hooks and layer variant.
- [`lorafleet.compat.transformers`]: the per-family attention functions and the KV-cache argument's name.
- [`lorafleet.compat.ray`]: Ray Train's storage context and the controller's poll interval.
- [`lorafleet.compat.bitsandbytes`]: the in-place CPU weight repack of `Linear4bit`; its import-time `torch.compile`.
- [`lorafleet.compat.accelerate`]: saving a model without importing DeepSpeed.
- [`lorafleet.compat.deepspeed`]: restoring a worker's ZeRO optimizer state from its own shard.
- [`lorafleet.compat.datasets`]: a loaded dataset's fingerprint and indices mapping; the `save_to_disk` layout.

Each module's docstring lists the private names it touches, the versions they were checked on, and the upstream
change that would let the workaround go. `tests/unit/compat/` holds one test per assumption, each failing with a
message naming it, so an upgrade that breaks one says which. The library imports inside these modules are deferred to
the first call: lorafleet's CLI imports the call sites, and `import peft` or `import bitsandbytes` each cost seconds.

Example:

```python
>>> from lorafleet.compat import peft, ray
>>> callable(peft.hooked_alora_offsets), sorted(ray.TRAIN_ENV)
(True, ['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'])
```
"""
