"""SAM core and its presets."""

from ._cheap import AESAMPolicy
from .presets import AESAM, ASAM, ESAM, GSAM, MSAM, WSAM, FriendlySAM, LookSAM
from .sam import SAM

__all__ = ["SAM", "ASAM", "GSAM", "ESAM", "FriendlySAM", "LookSAM", "AESAM", "MSAM", "WSAM", "AESAMPolicy"]
