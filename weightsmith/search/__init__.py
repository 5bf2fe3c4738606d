"""The budget search: optuna finds the best model that fits a size budget (:mod:`.run`), from a space of
per-group settings (:mod:`.space`), scored by a cheap KL proxy on cached candidates (:mod:`.proxy`)."""
