"""``lenscap estimate``: tokens, cost and wall time before spending anything."""
