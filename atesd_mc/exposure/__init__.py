"""Teacher exposure: the reveal ratio alpha and the schedules that choose it (ATESD_SPEC §2-3)."""
from .controller import AdaptiveController
from .reveal import reveal_text, reveal_tokens, revealed_count
from .schedules import ExposureSchedule, FixedExposure, RandomExposure, make_exposure

__all__ = ["AdaptiveController", "ExposureSchedule", "FixedExposure", "RandomExposure",
           "make_exposure", "reveal_text", "reveal_tokens", "revealed_count"]
