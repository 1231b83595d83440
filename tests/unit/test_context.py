"""Context extraction: channels, sources, devices, time features, validation, caching."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import pytest
import ua_parser
from hypothesis import given
from hypothesis import strategies as st

from allocsvc.context import (
    SEGMENT_DIMENSIONS,
    ContextLimits,
    ExtractedContext,
    Extractor,
    classify_device,
    extract,
    referrer_domain,
    source_for_domain,
)
from allocsvc.errors import InvalidRequest

pytestmark = pytest.mark.unit

LIMITS = ContextLimits()
# Tuesday 2023-11-14 22:13:20 UTC
TUESDAY_NIGHT_MS = 1_700_000_000_000
# Saturday 2024-06-15 09:30:00 UTC
SATURDAY_MORNING_MS = int(datetime(2024, 6, 15, 9, 30, tzinfo=UTC).timestamp() * 1000)

IPHONE_SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
ANDROID_CHROME = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36"
)
ANDROID_TABLET_CHROME = (
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/122.0.0.0 Safari/537.36"
)
IPAD_SAFARI = (
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/16.6 Mobile/15E148 Safari/604.1"
)
WINDOWS_CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
MAC_SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GOOGLEBOT_SMARTPHONE = (
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.6367.60 Mobile Safari/537.36 "
    "(compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
)
FACEBOOK_IN_APP_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_3 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/450.0.0.38.108;FBBV/564431005;"
    "FBDV/iPhone14,5;FBMD/iPhone;FBSN/iOS;FBSV/17.3;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5]"
)


def web(context: dict[str, str], **signals: float) -> ExtractedContext:
    return extract("web", context, signals, TUESDAY_NIGHT_MS, LIMITS)


# Channels


def test_web_context_is_extracted() -> None:
    ctx = web(
        {
            "utm_source": " Newsletter ",
            "user_agent": IPHONE_SAFARI,
            "country_code": "US",
            "referrer": "https://www.google.com/search?q=shoes",
        },
        pages_viewed=3,
        time_seconds=42.5,
    )
    assert ctx == ExtractedContext(
        channel="web",
        source="newsletter",
        device="mobile",
        country="us",
        hour=22,
        day_of_week=1,
        is_weekend=False,
        referrer_domain="google.com",
        pages_viewed=3,
        time_seconds=42.5,
    )


def test_empty_channel_means_web_and_channel_is_case_insensitive() -> None:
    assert extract("", {}, {}, TUESDAY_NIGHT_MS, LIMITS).channel == "web"
    assert extract(" Email ", {}, {}, TUESDAY_NIGHT_MS, LIMITS).channel == "email"


@pytest.mark.parametrize(
    ("referrer", "source"),
    [
        ("https://www.google.com/search?q=x", "google"),
        ("https://www.google.co.uk/", "google"),
        ("android-app://com.google.android.googlequicksearchbox/", "google"),
        ("https://www.bing.com/", "bing"),
        ("https://duckduckgo.com/", "duckduckgo"),
        ("https://l.facebook.com/l.php?u=x", "facebook"),
        ("https://m.facebook.com/", "facebook"),
        ("https://l.instagram.com/?u=x", "instagram"),
        ("https://t.co/abc", "twitter"),
        ("https://x.com/someone/status/1", "twitter"),
        ("https://www.linkedin.com/feed/", "linkedin"),
        ("https://www.youtube.com/watch?v=1", "youtube"),
        ("https://mail.google.com/mail/u/0/", "email"),
        ("https://news.ycombinator.com/item?id=1", "referral"),
        ("blog.example.org", "referral"),
        ("", "direct"),
    ],
)
def test_web_source_from_referrer(referrer: str, source: str) -> None:
    assert web({"referrer": referrer}).source == source


def test_web_source_prefers_utm_source_over_referrer() -> None:
    ctx = web({"utm_source": "Instagram", "referrer": "https://www.google.com/"})
    assert (ctx.source, ctx.referrer_domain) == ("instagram", "google.com")


def test_web_without_utm_source_or_referrer_is_direct() -> None:
    assert web({"utm_source": "  "}).source == "direct"


@pytest.mark.parametrize(
    ("referrer", "domain"),
    [
        ("https://www.Google.COM/search?q=x", "google.com"),
        ("http://user:pw@shop.example.com:8080/a#b", "shop.example.com"),
        ("//cdn.example.net/x", "cdn.example.net"),
        ("example.com", "example.com"),
        ("https://example.com.", "example.com"),
        ("https://[2001:db8::1]:443/", "[2001:db8::1]"),
        ("   ", ""),
    ],
)
def test_referrer_domain(referrer: str, domain: str) -> None:
    assert referrer_domain(referrer) == domain


def test_source_for_empty_domain_is_direct() -> None:
    assert source_for_domain("") == "direct"


def test_email_context_is_extracted() -> None:
    ctx = extract(
        "email",
        {"list_id": "Weekly-Digest", "campaign_id": "SPRING24", "country_code": "de"},
        {"engagement_score": 0.7, "previous_opens": 12},
        SATURDAY_MORNING_MS,
        LIMITS,
    )
    assert ctx == ExtractedContext(
        channel="email",
        source="email",
        device="unknown",
        country="de",
        hour=9,
        day_of_week=5,
        is_weekend=True,
        list_id="weekly-digest",
        campaign_id="spring24",
        engagement_score=0.7,
        previous_opens=12,
    )


def test_funnel_context_is_extracted() -> None:
    ctx = extract(
        "funnel",
        {"funnel_id": "Checkout", "current_stage": "Payment", "user_agent": WINDOWS_CHROME},
        {"drop_risk": 0.25, "time_in_funnel": 180},
        TUESDAY_NIGHT_MS,
        LIMITS,
    )
    assert ctx.source == "funnel_checkout"
    assert (ctx.funnel_id, ctx.current_stage) == ("checkout", "payment")
    assert (ctx.drop_risk, ctx.time_in_funnel) == (0.25, 180)
    assert ctx.device == "desktop"
    assert extract("funnel", {}, {}, TUESDAY_NIGHT_MS, LIMITS).source == "funnel"


def test_push_context_is_extracted() -> None:
    ctx = extract(
        "push",
        {"campaign_id": "flash-sale", "device": "Mobile"},
        {"previous_opens": 2},
        TUESDAY_NIGHT_MS,
        LIMITS,
    )
    assert (ctx.channel, ctx.source, ctx.device) == ("push", "push", "mobile")
    assert (ctx.campaign_id, ctx.previous_opens) == ("flash-sale", 2)


def test_fields_of_other_channels_are_not_read() -> None:
    ctx = web({"list_id": "weekly", "funnel_id": "checkout"}, drop_risk=0.9)
    assert (ctx.list_id, ctx.funnel_id, ctx.drop_risk) == ("", "", None)


def test_explicit_device_overrides_user_agent() -> None:
    assert web({"device": "tablet", "user_agent": IPHONE_SAFARI}).device == "tablet"


# Time features


@pytest.mark.parametrize(
    ("timestamp_ms", "hour", "day_of_week", "is_weekend"),
    [
        (TUESDAY_NIGHT_MS, 22, 1, False),
        (SATURDAY_MORNING_MS, 9, 5, True),
        (1, 0, 3, False),  # 1970-01-01 was a Thursday
    ],
)
def test_time_features(timestamp_ms: int, hour: int, day_of_week: int, is_weekend: bool) -> None:
    ctx = extract("web", {}, {}, timestamp_ms, LIMITS)
    assert (ctx.hour, ctx.day_of_week, ctx.is_weekend) == (hour, day_of_week, is_weekend)


@given(st.integers(min_value=1, max_value=253_402_300_799_999))  # up to year 9999
def test_time_features_match_datetime(timestamp_ms: int) -> None:
    ctx = extract("web", {}, {}, timestamp_ms, LIMITS)
    expected = datetime.fromtimestamp(timestamp_ms // 1000, tz=UTC)
    assert (ctx.hour, ctx.day_of_week) == (expected.hour, expected.weekday())
    assert ctx.is_weekend == (expected.weekday() >= 5)


def test_zero_timestamp_means_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: SATURDAY_MORNING_MS * 1_000_000)
    ctx = extract("web", {}, {}, 0, LIMITS)
    assert (ctx.hour, ctx.day_of_week) == (9, 5)


# User agent -> device


@pytest.mark.parametrize(
    ("user_agent", "device"),
    [
        (IPHONE_SAFARI, "mobile"),
        (ANDROID_CHROME, "mobile"),
        (FACEBOOK_IN_APP_IPHONE, "mobile"),
        ("Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0", "mobile"),
        (IPAD_SAFARI, "tablet"),
        (ANDROID_TABLET_CHROME, "tablet"),
        ("Mozilla/5.0 (Android 14; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0", "tablet"),
        (WINDOWS_CHROME, "desktop"),
        (MAC_SAFARI, "desktop"),
        ("Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", "desktop"),
        (
            "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Safari/537.36",
            "desktop",
        ),
        (GOOGLEBOT, "unknown"),
        (GOOGLEBOT_SMARTPHONE, "unknown"),
        ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", "unknown"),
        ("curl/8.5.0", "unknown"),
        ("python-requests/2.31.0", "unknown"),
        ("", "unknown"),
        ("   ", "unknown"),
    ],
)
def test_device_from_user_agent(user_agent: str, device: str) -> None:
    assert classify_device(user_agent) == device
    assert web({"user_agent": user_agent}).device == device


def test_missing_user_agent_is_unknown_device() -> None:
    assert web({}).device == "unknown"


def test_same_user_agent_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parses: list[str] = []
    real_parse = ua_parser.parse

    def counting_parse(user_agent: str) -> ua_parser.Result:
        parses.append(user_agent)
        return real_parse(user_agent)

    monkeypatch.setattr(ua_parser, "parse", counting_parse)
    extractor = Extractor(ua_cache_size=2)
    for _ in range(3):
        assert extractor.extract("web", {"user_agent": IPHONE_SAFARI}, {}).device == "mobile"
    info = extractor.cache_info()
    assert (info.hits, info.misses, info.currsize, info.maxsize) == (2, 1, 1, 2)
    assert parses == [IPHONE_SAFARI]


def test_user_agent_cache_is_bounded() -> None:
    extractor = Extractor(ua_cache_size=2)
    for user_agent in (IPHONE_SAFARI, IPAD_SAFARI, WINDOWS_CHROME, IPHONE_SAFARI):
        extractor.device(user_agent)
    info = extractor.cache_info()
    assert (info.hits, info.misses, info.currsize) == (0, 4, 2)
    extractor.cache_clear()
    assert extractor.cache_info().currsize == 0


# Segment dimensions


def test_dimension_values() -> None:
    ctx = extract(
        "email",
        {"list_id": "News:Letter|1", "country_code": "fr", "user_agent": IPAD_SAFARI},
        {},
        SATURDAY_MORNING_MS,
        LIMITS,
    )
    assert {name: ctx.dimension(name) for name in SEGMENT_DIMENSIONS} == {
        "channel": "email",
        "source": "email",
        "device": "tablet",
        "country": "fr",
        "hour": "9",
        "day_of_week": "5",
        "is_weekend": "true",
        "list_id": "news_letter_1",
        "campaign_id": "unknown",
        "funnel_id": "unknown",
        "current_stage": "unknown",
    }
    assert ctx.dimensions(["country", "device", "is_weekend"]) == ("fr", "tablet", "true")


def test_missing_values_read_as_unknown() -> None:
    ctx = web({})
    assert ctx.dimensions(["country", "device", "list_id"]) == ("unknown", "unknown", "unknown")
    assert ctx.dimension("is_weekend") == "false"


def test_unknown_dimension_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="pages_viewed"):
        web({}).dimension("pages_viewed")


def test_extracted_context_is_frozen() -> None:
    ctx = web({})
    with pytest.raises(AttributeError):
        ctx.source = "google"  # type: ignore[misc]


# Validation


def invalid(
    channel: str = "web",
    context: dict[str, str] | None = None,
    signals: dict[str, float] | None = None,
    timestamp_ms: int = TUESDAY_NIGHT_MS,
    limits: ContextLimits = LIMITS,
) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        extract(channel, context or {}, signals or {}, timestamp_ms, limits)
    return caught.value


def test_unknown_channel() -> None:
    err = invalid(channel="sms")
    assert err.field == "channel"
    assert "sms" in err.message
    assert str(err).startswith("channel: unknown channel 'sms'")


def test_too_many_context_entries() -> None:
    context = {f"k{i}": "v" for i in range(65)}
    assert invalid(context=context).field == "context"
    extract("web", dict(list(context.items())[:64]), {}, TUESDAY_NIGHT_MS, LIMITS)


def test_context_limits_are_configurable() -> None:
    limits = ContextLimits(max_context_entries=2, max_value_chars=4)
    assert invalid(context={"a": "1", "b": "2", "c": "3"}, limits=limits).field == "context"
    assert invalid(context={"utm_source": "abcde"}, limits=limits).field == "context[utm_source]"


def test_too_long_context_key() -> None:
    key = "k" * 65
    err = invalid(context={key: "v"})
    assert err.field == f"context[{'k' * 64}...]"


def test_empty_context_key() -> None:
    assert invalid(context={"": "v"}).field == "context[]"


def test_too_long_context_value() -> None:
    assert invalid(context={"campaign": "x" * 257}).field == "context[campaign]"
    extract("web", {"campaign": "x" * 256}, {}, TUESDAY_NIGHT_MS, LIMITS)


def test_user_agent_and_referrer_may_be_longer_than_other_values() -> None:
    long_ua = WINDOWS_CHROME + " x" * 200
    assert web({"user_agent": long_ua}).device == "desktop"
    assert invalid(context={"user_agent": "x" * 1025}).field == "context[user_agent]"
    long_referrer = "https://www.google.com/search?q=" + "x" * 1000
    assert web({"referrer": long_referrer}).source == "google"
    assert invalid(context={"referrer": "x" * 2049}).field == "context[referrer]"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_signal(value: float) -> None:
    err = invalid(signals={"pages_viewed": 1.0, "time_seconds": value})
    assert err.field == "signals[time_seconds]"


def test_too_many_signals() -> None:
    assert invalid(signals={f"s{i}": 1.0 for i in range(65)}).field == "signals"


def test_too_long_signal_key() -> None:
    assert invalid(signals={"s" * 65: 1.0}).field.startswith("signals[sss")


@pytest.mark.parametrize("code", ["USA", "U", "1A", "ü1", "u s"])
def test_malformed_country_code(code: str) -> None:
    assert invalid(context={"country_code": code}).field == "context[country_code]"


def test_blank_country_code_is_unknown() -> None:
    assert web({"country_code": " "}).country == "unknown"


def test_unknown_explicit_device() -> None:
    assert invalid(context={"device": "phablet"}).field == "context[device]"


def test_negative_timestamp() -> None:
    assert invalid(timestamp_ms=-1).field == "timestamp_unix_ms"


@pytest.mark.parametrize(
    "kwargs", [{"max_context_entries": 0}, {"max_key_chars": -1}, {"max_value_chars": 1.5}]
)
def test_context_limits_validate_themselves(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ContextLimits"):
        ContextLimits(**kwargs)  # type: ignore[arg-type]
