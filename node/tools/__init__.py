"""The node's tools around serving: `imu-node check` (drive a running node and judge the targets),
`imu-node doctor` (what is wrong and what to do) and a loopback broker for the demo, tests and
benches."""
