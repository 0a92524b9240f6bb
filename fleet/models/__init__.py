"""Model tooling beyond packaging: parity validation across backends, compilation."""
