"""Context extraction (SPEC §5): raw request context in, one uniform `ExtractedContext` out.

Runs on every allocation, so it does plain string work, reads each known key once, and caches the
two expensive steps (user agent → device, referrer domain → source).
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import ua_parser

from allocsvc.context.device import DESKTOP, MOBILE, TABLET, UNKNOWN, classify_device
from allocsvc.context.source import DIRECT, referrer_domain, source_for_domain
from allocsvc.errors import InvalidRequest

WEB: Final = "web"
EMAIL: Final = "email"
FUNNEL: Final = "funnel"
PUSH: Final = "push"
CHANNELS: Final = frozenset({WEB, EMAIL, FUNNEL, PUSH})

SEGMENT_DIMENSIONS: Final = frozenset(
    {
        "channel",
        "source",
        "device",
        "country",
        "hour",
        "day_of_week",
        "is_weekend",
        "list_id",
        "campaign_id",
        "funnel_id",
        "current_stage",
    }
)
"""Names `ExtractedContext.dimension` accepts, i.e. the allowed `segment_by` entries."""

DEFAULT_UA_CACHE_SIZE: Final = 4096

_EXPLICIT_DEVICES: Final = frozenset({MOBILE, DESKTOP, TABLET})
_HOURS: Final = tuple(str(h) for h in range(24))
_WEEKDAYS: Final = tuple(str(d) for d in range(7))
_MS_PER_DAY: Final = 86_400_000
_MS_PER_HOUR: Final = 3_600_000
_EPOCH_WEEKDAY: Final = 3  # 1970-01-01 was a Thursday (Monday = 0)


@dataclass(frozen=True, slots=True)
class ContextLimits:
    """Size limits on a request's raw context; they validate themselves."""

    max_context_entries: int = 64
    max_signals: int = 64
    max_key_chars: int = 64
    max_value_chars: int = 256
    # User agents and referrer URLs are routinely longer than other values.
    max_user_agent_chars: int = 1024
    max_referrer_chars: int = 2048

    def __post_init__(self) -> None:
        for name in (
            "max_context_entries",
            "max_signals",
            "max_key_chars",
            "max_value_chars",
            "max_user_agent_chars",
            "max_referrer_chars",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ContextLimits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class ExtractedContext:
    """The uniform view of one request's context, the same shape for every channel.

    Text values are canonical: trimmed, lower-cased, and free of the segment-key separators ":"
    and "|" (replaced by "_"). Channel fields that the channel does not have, or that the request
    left out, are "" (text) or None (numbers).
    """

    channel: str  # "web", "email", "funnel" or "push"
    # utm_source or the referrer's source for web ("google", "facebook", "referral", "direct"),
    # "email" for email, "funnel_<funnel_id>" (or "funnel") for funnel, "push" for push.
    source: str
    device: str  # "mobile", "desktop", "tablet" or "unknown" (also bots)
    country: str  # ISO 3166-1 alpha-2 code, lower-case ("us"), or "unknown"
    hour: int  # 0-23, UTC
    day_of_week: int  # 0 = Monday ... 6 = Sunday, UTC
    is_weekend: bool  # Saturday or Sunday, UTC
    referrer_domain: str = ""  # web: the referrer's host without "www."
    list_id: str = ""  # email
    campaign_id: str = ""  # email, push
    funnel_id: str = ""  # funnel
    current_stage: str = ""  # funnel
    pages_viewed: float | None = None  # web
    time_seconds: float | None = None  # web: time on site
    engagement_score: float | None = None  # email, push
    previous_opens: float | None = None  # email, push
    drop_risk: float | None = None  # funnel
    time_in_funnel: float | None = None  # funnel

    def dimension(self, name: str) -> str:
        """Segment value of dimension `name` (one of SEGMENT_DIMENSIONS), e.g. "mobile", "7".

        A value the request did not give reads as "unknown". Raises KeyError for a name that is
        not a segment dimension (experiment configs are validated against SEGMENT_DIMENSIONS).
        """
        try:
            getter = _DIMENSION_GETTERS[name]
        except KeyError:
            raise KeyError(f"unknown segment dimension {name!r}") from None
        return getter(self) or UNKNOWN

    def dimensions(self, names: Iterable[str]) -> tuple[str, ...]:
        """Segment values of several dimensions, in the order given."""
        return tuple(self.dimension(name) for name in names)


_DIMENSION_GETTERS: Final[dict[str, Callable[[ExtractedContext], str]]] = {
    "channel": operator.attrgetter("channel"),
    "source": operator.attrgetter("source"),
    "device": operator.attrgetter("device"),
    "country": operator.attrgetter("country"),
    "hour": lambda c: _HOURS[c.hour],
    "day_of_week": lambda c: _WEEKDAYS[c.day_of_week],
    "is_weekend": lambda c: "true" if c.is_weekend else "false",
    "list_id": operator.attrgetter("list_id"),
    "campaign_id": operator.attrgetter("campaign_id"),
    "funnel_id": operator.attrgetter("funnel_id"),
    "current_stage": operator.attrgetter("current_stage"),
}


def _canonical(value: str) -> str:
    value = value.strip().lower()
    if ":" in value or "|" in value:
        value = value.replace(":", "_").replace("|", "_")
    return value


def _field(container: str, key: str, limits: ContextLimits) -> str:
    if len(key) > limits.max_key_chars:
        key = key[: limits.max_key_chars] + "..."
    return f"{container}[{key}]"


def _validate(
    context: Mapping[str, str], signals: Mapping[str, float], limits: ContextLimits
) -> None:
    if len(context) > limits.max_context_entries:
        raise InvalidRequest(
            "context",
            f"has {len(context)} entries, at most {limits.max_context_entries} are allowed",
        )
    max_key = limits.max_key_chars
    max_value = limits.max_value_chars
    for key, value in context.items():
        if not key or len(key) > max_key:
            raise InvalidRequest(
                _field("context", key, limits), f"key must be 1 to {max_key} characters long"
            )
        if len(value) > max_value:
            if key == "user_agent":
                allowed = limits.max_user_agent_chars
            elif key == "referrer":
                allowed = limits.max_referrer_chars
            else:
                allowed = max_value
            if len(value) > allowed:
                raise InvalidRequest(
                    _field("context", key, limits),
                    f"value is {len(value)} characters long, at most {allowed} are allowed",
                )
        if "\x00" in key or "\x00" in value:
            # NUL cannot be stored in PostgreSQL text; refuse it here rather than fail later.
            raise InvalidRequest(_field("context", key, limits), "must not contain NUL characters")
    if len(signals) > limits.max_signals:
        raise InvalidRequest(
            "signals", f"has {len(signals)} entries, at most {limits.max_signals} are allowed"
        )
    for key, number in signals.items():
        if not key or len(key) > max_key:
            raise InvalidRequest(
                _field("signals", key, limits), f"key must be 1 to {max_key} characters long"
            )
        if "\x00" in key:
            raise InvalidRequest(_field("signals", key, limits), "must not contain NUL characters")
        if not math.isfinite(number):
            raise InvalidRequest(_field("signals", key, limits), f"must be finite, got {number}")


def _channel(channel: str) -> str:
    if channel in CHANNELS:
        return channel
    if not channel:
        return WEB
    normalized = channel.strip().lower()
    if normalized in CHANNELS:
        return normalized
    if not normalized:
        return WEB
    raise InvalidRequest(
        "channel",
        f"unknown channel {channel[:64]!r}, expected one of {', '.join(sorted(CHANNELS))}",
    )


def _country(context: Mapping[str, str]) -> str:
    code = context.get("country_code")
    if not code:
        return UNKNOWN
    code = code.strip()
    if not code:
        return UNKNOWN
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        raise InvalidRequest(
            "context[country_code]",
            f"must be an ISO 3166-1 alpha-2 country code like 'US', got {code[:16]!r}",
        )
    return code.lower()


def _device(context: Mapping[str, str], device_of: Callable[[str], str]) -> str:
    explicit = context.get("device")
    if explicit:
        device = explicit.strip().lower()
        if device in _EXPLICIT_DEVICES:
            return device
        if device:
            raise InvalidRequest(
                "context[device]",
                f"must be one of desktop, mobile, tablet, got {explicit[:32]!r}",
            )
    user_agent = context.get("user_agent")
    return device_of(user_agent) if user_agent else UNKNOWN


def _extract(
    channel: str,
    context: Mapping[str, str],
    signals: Mapping[str, float],
    timestamp_ms: int,
    limits: ContextLimits,
    device_of: Callable[[str], str],
) -> ExtractedContext:
    if timestamp_ms < 0:
        raise InvalidRequest("timestamp_unix_ms", "must be >= 0 (0 means now)")
    channel = _channel(channel)
    _validate(context, signals, limits)
    if timestamp_ms == 0:
        timestamp_ms = time.time_ns() // 1_000_000
    days, ms_of_day = divmod(timestamp_ms, _MS_PER_DAY)
    day_of_week = (days + _EPOCH_WEEKDAY) % 7
    hour = ms_of_day // _MS_PER_HOUR
    device = _device(context, device_of)
    country = _country(context)
    get = context.get
    signal = signals.get

    if channel == WEB:
        referrer = get("referrer")
        domain = referrer_domain(referrer) if referrer else ""
        utm_source = get("utm_source")
        source = _canonical(utm_source) if utm_source else ""
        if not source:
            source = source_for_domain(domain) if domain else DIRECT
        return ExtractedContext(
            channel,
            source,
            device,
            country,
            hour,
            day_of_week,
            day_of_week >= 5,
            referrer_domain=domain,
            pages_viewed=signal("pages_viewed"),
            time_seconds=signal("time_seconds"),
        )
    if channel == EMAIL:
        return ExtractedContext(
            channel,
            EMAIL,
            device,
            country,
            hour,
            day_of_week,
            day_of_week >= 5,
            list_id=_canonical(get("list_id", "")),
            campaign_id=_canonical(get("campaign_id", "")),
            engagement_score=signal("engagement_score"),
            previous_opens=signal("previous_opens"),
        )
    if channel == FUNNEL:
        funnel_id = _canonical(get("funnel_id", ""))
        return ExtractedContext(
            channel,
            f"funnel_{funnel_id}" if funnel_id else FUNNEL,
            device,
            country,
            hour,
            day_of_week,
            day_of_week >= 5,
            funnel_id=funnel_id,
            current_stage=_canonical(get("current_stage", "")),
            drop_risk=signal("drop_risk"),
            time_in_funnel=signal("time_in_funnel"),
        )
    return ExtractedContext(
        channel,
        PUSH,
        device,
        country,
        hour,
        day_of_week,
        day_of_week >= 5,
        campaign_id=_canonical(get("campaign_id", "")),
        engagement_score=signal("engagement_score"),
        previous_opens=signal("previous_opens"),
    )


class Extractor:
    """Extracts contexts with fixed limits and its own user-agent → device LRU cache."""

    __slots__ = ("_device_of", "limits")

    def __init__(
        self, limits: ContextLimits | None = None, *, ua_cache_size: int = DEFAULT_UA_CACHE_SIZE
    ) -> None:
        if ua_cache_size < 0:
            raise ValueError(f"ua_cache_size must be >= 0, got {ua_cache_size}")
        self.limits = limits if limits is not None else ContextLimits()
        self._device_of = functools.lru_cache(maxsize=ua_cache_size)(classify_device)

    def extract(
        self,
        channel: str,
        context: Mapping[str, str],
        signals: Mapping[str, float],
        timestamp_ms: int = 0,
    ) -> ExtractedContext:
        """Validate and extract one request's context; raises InvalidRequest naming the field."""
        return _extract(channel, context, signals, timestamp_ms, self.limits, self._device_of)

    def device(self, user_agent: str) -> str:
        """Device class of a user agent, through this extractor's cache."""
        return self._device_of(user_agent)

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses and size of the user-agent cache."""
        return self._device_of.cache_info()

    def cache_clear(self) -> None:
        """Empty the user-agent cache."""
        self._device_of.cache_clear()

    @staticmethod
    def warm_up() -> None:
        """Load ua-parser's rules now (a few hundred ms) instead of on the first request."""
        ua_parser.parse("Mozilla/5.0")


device_from_user_agent: Final = functools.lru_cache(maxsize=DEFAULT_UA_CACHE_SIZE)(classify_device)
"""Process-wide cached `classify_device`, used by the module-level `extract`."""


def extract(
    channel: str,
    context: Mapping[str, str],
    signals: Mapping[str, float],
    timestamp_ms: int,
    limits: ContextLimits,
) -> ExtractedContext:
    """Validate and extract one request's context (SPEC §5), with the process-wide UA cache.

    `channel` "" means web; `timestamp_ms` 0 means now. Raises InvalidRequest whose `field` names
    the offending request field ("channel", "context", "context[<key>]", "signals[<key>]",
    "timestamp_unix_ms").
    """
    return _extract(channel, context, signals, timestamp_ms, limits, device_from_user_agent)
