"""Model updates: follow the desired state (node > group > fleet), check the signed order, fetch
and verify the bundle, load and golden-check it, and hot-swap it in between two batches."""
