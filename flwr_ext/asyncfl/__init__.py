"""Asynchronous federated learning on Flower's Grid: the event loop, clocks, device profiles.

Strategies subclass :class:`AsyncStrategy` (:mod:`flwr_ext.asyncfl.strategy`) and see the engine
through :class:`EngineAPI`; docs/asyncfl.md has the design notes.
"""

from flwr_ext.asyncfl.clock import JobTiming, RealClock, VirtualClock
from flwr_ext.asyncfl.engine import AsyncEngine
from flwr_ext.asyncfl.options import EngineOptions
from flwr_ext.asyncfl.profiles import DeviceProfile, NodeSpeed
from flwr_ext.asyncfl.records import AsyncResult, UpdateRecord
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Timer, Update

__all__ = [
    "AsyncEngine",
    "AsyncResult",
    "AsyncStrategy",
    "DeviceProfile",
    "EngineAPI",
    "EngineOptions",
    "Job",
    "JobTiming",
    "NodeSpeed",
    "NodeState",
    "RealClock",
    "Timer",
    "Update",
    "UpdateRecord",
    "VirtualClock",
]
