"""`imu-fleet dashboard`: a live page of the fleet for people without Grafana.

One process subscribes to the broker with the read-only dashboard role (`view`), keeps a bounded
picture of the fleet, and serves one static page (`static/`) that it updates over server-sent
events (`server`), plus Prometheus metrics (`metrics`). See docs/dashboard.md.
"""
