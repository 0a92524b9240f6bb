"""doctor tells the node it checks from other nodes running on the same machine.

A node running here makes doctor ask it instead of logging in as it (a broker that ties sessions
to logins would hand doctor the node's session). Another node's process (a second node on a test
machine, another site's) must not stop doctor from checking this node's own login.
"""

from __future__ import annotations

from pathlib import Path

from node.tools.doctor import _node_id_of


def test_a_node_id_on_the_command_line_names_the_node() -> None:
    assert _node_id_of(["imu-node", "run", "--node-id", "pi-1"], None) == "pi-1"
    assert _node_id_of(["imu-node", "run", "--node-id=pi-2"], None) == "pi-2"


def test_the_config_file_names_the_node_relative_to_the_process_folder(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text('node_id = "pi-3"\ngroup = "g"\n')
    assert _node_id_of(["imu-node", "run", "--config", "node.toml"], str(tmp_path)) == "pi-3"
    assert _node_id_of(["imu-node", "run", "--config", str(tmp_path / "node.toml")], None) == "pi-3"


def test_what_cannot_be_read_may_be_this_node(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("node_id = [")
    (tmp_path / "none.toml").write_text('group = "g"\n')
    for words in (
        ["imu-node", "run"],
        ["imu-node", "run", "--config", str(tmp_path / "missing.toml")],
        ["imu-node", "run", "--config", str(tmp_path / "bad.toml")],
        ["imu-node", "run", "--config", str(tmp_path / "none.toml")],
    ):
        assert _node_id_of(words, None) is None
