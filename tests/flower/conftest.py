"""Flower tests need flwr (the optional extra); without it every module here is skipped."""

from __future__ import annotations

import pytest

flwr = pytest.importorskip("flwr")


@pytest.fixture(autouse=True)
def task_identity():
    """Outside a running app, flwr needs a task identity to build instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
