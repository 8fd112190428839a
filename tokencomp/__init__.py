"""tokencomp: compare visual-token compression strategies for vision-language models.

The public API::

    import tokencomp as tc
    tc.available()                                  # registered strategy names
    comp = tc.create("apet", basis="qr", num_basis=10)
    result = comp.compress(tokens, 64)              # tokens [B, N, D] or [N, D]
    handle = tc.apply(model, "apet", budget=64)     # inside a Hugging Face VLM; handle.remove()
"""

from .base import Compressor
from .errors import InvalidParameterError
from .integrations import Handle, apply
from .kernels.gather import selection_result
from .registry import available, create, get, register
from .types import CompressionResult, Context

__version__ = "0.1.0"

__all__ = [
    "CompressionResult",
    "Compressor",
    "Context",
    "Handle",
    "InvalidParameterError",
    "apply",
    "available",
    "create",
    "get",
    "register",
    "selection_result",
]
