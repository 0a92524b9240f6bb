"""The demo: a local broker, a node on the reference model, simulated sensors, live results.

It sits above both node/ and fleet/ (it runs a node and the fleet's sensor simulator), so it is
a package of its own. It adds `demo` to `imu-node` through the `imu_edge.node_commands` entry
point (node/cli.py loads commands from there without importing this package by name), and runs
as `python -m demo` too.
"""
