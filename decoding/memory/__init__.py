"""The memory guard: what a model and its caches will take (footprint) against what the machine has
(guard), checked before a load and before a context grows."""
