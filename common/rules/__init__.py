"""Aggregation rules as objects, one module per rule (paper cited in each), and the registry of their names."""
