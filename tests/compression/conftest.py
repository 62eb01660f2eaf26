"""Fixtures of the compression tests that build Flower messages outside a running app."""

from __future__ import annotations

import pytest

from flwr_ext.asyncfl.testing import task_identity as _task_identity


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a task identity; restore it after.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("task_identity")`` (the
    Simulation Engine tests in this folder must keep Flower's own identity).
    """
    with _task_identity():
        yield
