"""gRPC servicers: the only runtime code that imports protobuf types (see `convert.py`)."""

from loraplex.runtime.serve.servicers.admin import AdminServicer
from loraplex.runtime.serve.servicers.inference import InferenceServicer
from loraplex.runtime.serve.servicers.registry import RegistryServicer
from loraplex.runtime.serve.servicers.state import ServingState

__all__ = ["AdminServicer", "InferenceServicer", "RegistryServicer", "ServingState"]
