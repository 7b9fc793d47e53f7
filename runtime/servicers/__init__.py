"""gRPC servicers: the only runtime code that imports protobuf types (see `convert.py`)."""

from loraplex.runtime.servicers.admin import AdminServicer
from loraplex.runtime.servicers.inference import InferenceServicer
from loraplex.runtime.servicers.registry import RegistryServicer
from loraplex.runtime.servicers.state import ServingState

__all__ = ["AdminServicer", "InferenceServicer", "RegistryServicer", "ServingState"]
