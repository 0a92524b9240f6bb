"""Fleet rollouts: watch the nodes, plan waves, move node overrides, roll back on failure."""
