"""Values every stage must agree on, decided here once."""

# The label of a position that carries no loss (prompt tokens, padding, a packed sample's first token). PyTorch's
# `cross_entropy` and transformers use the same default, so labels built here mean the same to their losses.
IGNORE_INDEX = -100

# How a generated answer is scored against a record's target (`lorafleet.infer.scoring`): the names the spec's
# `eval.generate.metrics` accepts and the metrics records carry (`eval_<name>`, `base_<name>`).
GENERATION_METRICS = ("exact_match", "contains")

# Global batches per window that `data.group_by_length` sorts by length (`lorafleet.data.plan`): wide enough that a
# window holds many samples of each length, narrow enough that its batches still come from all over the epoch.
GROUP_WINDOW = 64
