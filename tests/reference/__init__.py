"""Reference implementations used only by tests and benchmarks (never shipped)."""
