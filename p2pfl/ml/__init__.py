"""Learning core: models, data, partitions, metrics, aggregation, training, the executor.

Every name below is importable from ``p2pfl.ml``, but its module is imported only when the name
is first used (PEP 562 ``__getattr__``): a daemon training digits does not import the traffic
and forecast modules, and importing ``p2pfl.ml.task`` does not import them either. The
``TYPE_CHECKING`` block is the same list for type checkers and readers; ``_SOURCES`` is what runs
(``tests/ml/test_lazy_imports.py`` keeps the two equal). Using any of these names imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.ml.aggregation import AGGREGATORS as AGGREGATORS
    from p2pfl.ml.aggregation import RULE_PARAMS as RULE_PARAMS
    from p2pfl.ml.aggregation import Aggregator as Aggregator
    from p2pfl.ml.aggregation import StateDict as StateDict
    from p2pfl.ml.aggregation import StateDictOps as StateDictOps
    from p2pfl.ml.aggregation import aggregate as aggregate
    from p2pfl.ml.aggregation import clip_toward as clip_toward
    from p2pfl.ml.aggregation import coordinate_median as coordinate_median
    from p2pfl.ml.aggregation import krum_select as krum_select
    from p2pfl.ml.aggregation import load_validated as load_validated
    from p2pfl.ml.aggregation import self_centred_clip as self_centred_clip
    from p2pfl.ml.aggregation import state_norm as state_norm
    from p2pfl.ml.aggregation import trimmed_mean as trimmed_mean
    from p2pfl.ml.aggregation import validate_update as validate_update
    from p2pfl.ml.aggregation import weighted_mean as weighted_mean
    from p2pfl.ml.catalog import TASKS as TASKS
    from p2pfl.ml.catalog import load_task as load_task
    from p2pfl.ml.executor import Executor as Executor
    from p2pfl.ml.forecast import CloudletData as CloudletData
    from p2pfl.ml.forecast import TrafficTask as TrafficTask
    from p2pfl.ml.forecast import baseline_metrics as baseline_metrics
    from p2pfl.ml.models import MLP as MLP
    from p2pfl.ml.models import STGCN as STGCN
    from p2pfl.ml.models import LogisticRegression as LogisticRegression
    from p2pfl.ml.models import SmallCNN as SmallCNN
    from p2pfl.ml.models import STGCNConfig as STGCNConfig
    from p2pfl.ml.partition import CloudletPartition as CloudletPartition
    from p2pfl.ml.partition import partition_cloudlets as partition_cloudlets
    from p2pfl.ml.partition import partition_samples as partition_samples
    from p2pfl.ml.readings import ReadingsError as ReadingsError
    from p2pfl.ml.readings import load_speeds as load_speeds
    from p2pfl.ml.synthetic import SpeedModel as SpeedModel
    from p2pfl.ml.synthetic import generate_speeds as generate_speeds
    from p2pfl.ml.task import ClassificationData as ClassificationData
    from p2pfl.ml.task import NodeData as NodeData
    from p2pfl.ml.task import Task as Task
    from p2pfl.ml.traffic import GraphFileError as GraphFileError
    from p2pfl.ml.traffic import SensorGraph as SensorGraph
    from p2pfl.ml.traffic import load_graph as load_graph
    from p2pfl.ml.train import TrainConfig as TrainConfig
    from p2pfl.ml.train import TrainReport as TrainReport

_SOURCES: dict[str, tuple[str, ...]] = {
    "aggregation": (
        "AGGREGATORS",
        "RULE_PARAMS",
        "Aggregator",
        "StateDict",
        "StateDictOps",
        "aggregate",
        "clip_toward",
        "coordinate_median",
        "krum_select",
        "load_validated",
        "self_centred_clip",
        "state_norm",
        "trimmed_mean",
        "validate_update",
        "weighted_mean",
    ),
    "catalog": ("TASKS", "load_task"),
    "executor": ("Executor",),
    "forecast": ("CloudletData", "TrafficTask", "baseline_metrics"),
    "models": ("MLP", "STGCN", "LogisticRegression", "SmallCNN", "STGCNConfig"),
    "partition": ("CloudletPartition", "partition_cloudlets", "partition_samples"),
    "readings": ("ReadingsError", "load_speeds"),
    "synthetic": ("SpeedModel", "generate_speeds"),
    "task": ("ClassificationData", "NodeData", "Task"),
    "traffic": ("GraphFileError", "SensorGraph", "load_graph"),
    "train": ("TrainConfig", "TrainReport"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pfl.ml' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"p2pfl.ml.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
