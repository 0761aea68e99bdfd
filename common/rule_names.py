"""Names of the aggregation rules, importable without torch (configs and the CLI validate against them)."""

RULE_NAMES: tuple[str, ...] = ("svd", "fedavg", "ffa")
"""Every rule in :data:`common.aggregation.RULES`."""

LINEAR_RULES: frozenset[str] = frozenset({"fedavg", "ffa"})
"""Rules that are sums of per-client terms, so secure aggregation (which only reveals sums) can compute them."""
