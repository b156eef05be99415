"""SAM core and its presets."""

from .presets import ASAM, ESAM, GSAM, FriendlySAM
from .sam import SAM

__all__ = ["SAM", "ASAM", "GSAM", "ESAM", "FriendlySAM"]
