"""What the engines train: the learning layer's workloads, chosen by the scenario.

The workloads themselves (``Workload``, ``TaskWorkload``, ``StateDictOps``) live in
:mod:`p2pfl.learning.ops`, shared with the daemon; this module picks one for a scenario.
"""

from __future__ import annotations

from p2pfl.learning.ops import TaskWorkload, Workload
from p2pfl.sim.scenario import Scenario, task_errors
from p2pfl.sim.vectorized import VectorizedLogReg


def make_workload(scenario: Scenario) -> Workload:
    with task_errors(scenario):
        if scenario.training.path == "vectorized":
            return VectorizedLogReg(scenario)
        return TaskWorkload(scenario)
