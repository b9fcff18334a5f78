"""drople_fast: fast DroPLe (Dropout Prompt Learning) for open_clip CLIP models."""
from .config import IWTDConfig
from .functional import Compacted, IWTDOutput, compact, compact_fixed, iwtd

__version__ = "0.1.0"

__all__ = ["IWTDConfig", "IWTDOutput", "Compacted", "iwtd", "compact", "compact_fixed", "__version__"]
