"""Request context: validation and extraction of the uniform segment dimensions (SPEC §5)."""

from allocsvc.context.device import DEVICE_CLASSES, classify_device
from allocsvc.context.extraction import (
    CHANNELS,
    SEGMENT_DIMENSIONS,
    ContextLimits,
    ExtractedContext,
    Extractor,
    device_from_user_agent,
    extract,
)
from allocsvc.context.source import referrer_domain, source_for_domain

__all__ = [
    "CHANNELS",
    "DEVICE_CLASSES",
    "SEGMENT_DIMENSIONS",
    "ContextLimits",
    "ExtractedContext",
    "Extractor",
    "classify_device",
    "device_from_user_agent",
    "extract",
    "referrer_domain",
    "source_for_domain",
]
