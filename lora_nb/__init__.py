__version__ = "0.1.0"

# Every module of lora_nb gets the filters of known-harmless library messages (nbs/01_core.ipynb) before it
# imports any library, whichever module is imported first.
from .core import quiet_known_noise as _quiet_known_noise  # noqa: E402,F401
