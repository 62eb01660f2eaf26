"""A stand-in for ``flwr.serverapp.Grid`` in tests that call ``configure_train`` directly."""

from __future__ import annotations


class NodeGrid:
    """Just enough of a Grid for ``configure_train``: a fixed list of node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
