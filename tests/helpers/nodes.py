"""Starting nodes in a test (the `start_node` fixture gives a `NodeFactory`)."""

from __future__ import annotations

from collections.abc import Callable

from node.app import NodeApp

NodeFactory = Callable[..., NodeApp]
"""`start_node(**settings)`: a started node on the session broker, stopped after the test."""
