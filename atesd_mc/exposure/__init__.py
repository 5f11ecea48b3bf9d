"""Teacher exposure: the reveal ratio alpha and the schedules that choose it (docs/METHOD.md, Reveal ratio and Controller)."""
from .controller import AdaptiveController
from .interface import ExposureSchedule
from .reveal import reveal_text, reveal_tokens, revealed_count
from .schedules import FixedExposure, RandomExposure, make_exposure

__all__ = ["AdaptiveController", "ExposureSchedule", "FixedExposure", "RandomExposure",
           "make_exposure", "reveal_text", "reveal_tokens", "revealed_count"]
