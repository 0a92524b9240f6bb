"""The node's HTTP endpoints: health, readiness, Prometheus metrics and EdgeInfer's /infer."""
