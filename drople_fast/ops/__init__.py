"""The IWTD operator: validation, Philox streams, the reference oracle, the backends and the functional API.

This layer knows nothing of open_clip or training: it takes tensors and returns tensors.
"""
from .functional import Compacted, IWTDOutput, compact, compact_fixed, iwtd

__all__ = ["Compacted", "IWTDOutput", "compact", "compact_fixed", "iwtd"]
