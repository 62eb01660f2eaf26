"""Fixtures of the compression tests that build Flower messages outside a running app."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a task identity; restore it after.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("task_identity")`` (the
    Simulation Engine tests in this folder must keep Flower's own identity).
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
