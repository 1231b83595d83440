"""Traffic source of a web request: its referrer's domain, mapped to a well-known source."""

from __future__ import annotations

import functools
from typing import Final

DIRECT: Final = "direct"
REFERRAL: Final = "referral"
EMAIL: Final = "email"

# Hosts (or their parent domains) that name a source by themselves.
_HOST_SOURCES: Final[dict[str, str]] = {
    "t.co": "twitter",
    "x.com": "twitter",
    "fb.com": "facebook",
    "fb.me": "facebook",
    "lnkd.in": "linkedin",
    "youtu.be": "youtube",
    "ya.ru": "yandex",
    "pin.it": "pinterest",
    "redd.it": "reddit",
    "mail.google.com": EMAIL,
    "com.google.android.gm": EMAIL,
    "mail.yahoo.com": EMAIL,
    "outlook.live.com": EMAIL,
    "outlook.office.com": EMAIL,
    "outlook.office365.com": EMAIL,
    "mail.yandex.ru": EMAIL,
    "mail.proton.me": EMAIL,
}

# A domain label (other than the top-level one) that names its brand: google.co.uk, l.facebook.com.
_BRAND_LABELS: Final = frozenset(
    {
        "google",
        "bing",
        "yahoo",
        "duckduckgo",
        "yandex",
        "baidu",
        "ecosia",
        "facebook",
        "instagram",
        "twitter",
        "linkedin",
        "pinterest",
        "reddit",
        "youtube",
        "tiktok",
        "snapchat",
    }
)


@functools.lru_cache(maxsize=2048)
def referrer_domain(referrer: str) -> str:
    """Lower-cased host of a referrer URL without "www." and port; "" when there is none.

    Accepts full URLs ("https://www.google.com/search?q=x"), scheme-relative ones and bare hosts
    ("google.com"). Cached: browsers mostly send only the origin of a cross-site referrer
    ("https://www.google.com/"), so a few values cover most requests.
    """
    host = referrer.strip()
    start = host.find("//")
    if start >= 0:
        host = host[start + 2 :]
    for sep in "/?#":
        end = host.find(sep)
        if end >= 0:
            host = host[:end]
    at = host.rfind("@")
    if at >= 0:
        host = host[at + 1 :]
    if host.startswith("["):  # IPv6 literal
        host = host[: host.find("]") + 1]
    else:
        colon = host.find(":")
        if colon >= 0:
            host = host[:colon]
    host = host.lower().rstrip(".")
    if host.startswith("www."):
        host = host[4:]
    if "|" in host:  # the segment-key separator; never part of a real host
        host = host.replace("|", "_")
    return host


@functools.lru_cache(maxsize=4096)
def source_for_domain(domain: str) -> str:
    """Source named by a referrer domain: "google", "facebook", "twitter", "email", ...

    A domain that names no known source is "referral"; an empty one is "direct".
    """
    if not domain:
        return DIRECT
    source = _HOST_SOURCES.get(domain)
    if source is not None:
        return source
    labels = domain.split(".")
    for i in range(1, len(labels) - 1):
        source = _HOST_SOURCES.get(".".join(labels[i:]))
        if source is not None:
            return source
    for label in labels[:-1]:
        if label in _BRAND_LABELS:
            return label
    return REFERRAL
