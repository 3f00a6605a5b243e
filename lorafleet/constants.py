"""Values every stage must agree on, decided here once."""

# The label of a position that carries no loss (prompt tokens, padding, a packed sample's first token). PyTorch's
# `cross_entropy` and transformers use the same default, so labels built here mean the same to their losses.
IGNORE_INDEX = -100
