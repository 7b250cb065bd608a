"""The models: config, building blocks and the Flax modules (pure functions of static shapes)."""
