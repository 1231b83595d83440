"""Device class (mobile, desktop, tablet, unknown) of a user agent, with ua-parser.

ua-parser gives families (device "iPhone", OS "Android", browser "Chrome Mobile"); the rules below
turn them into the device class, in the spirit of the `user-agents` package. Bots ("Spider") and
clients that name no platform (curl, HTTP libraries) are "unknown". iPadOS Safari sends a desktop
Mac user agent by default, so it reads as desktop: nothing in the string tells them apart.
"""

from __future__ import annotations

from typing import Final

import ua_parser

MOBILE: Final = "mobile"
DESKTOP: Final = "desktop"
TABLET: Final = "tablet"
UNKNOWN: Final = "unknown"

DEVICE_CLASSES: Final = frozenset({MOBILE, DESKTOP, TABLET, UNKNOWN})

_TABLET_DEVICES: Final = frozenset(
    {
        "iPad",
        "Generic Tablet",
        "Kindle",
        "Kindle Fire",
        "Kindle Fire HD",
        "Galaxy Tab",
        "Xoom",
        "BlackBerry Playbook",
        "Blackberry Playbook",
    }
)
_MOBILE_DEVICES: Final = frozenset(
    {"iPhone", "iPod", "iOS-Device", "Generic Smartphone", "Generic Feature Phone"}
)
_MOBILE_OS: Final = frozenset(
    {
        "iOS",
        "Android",
        "Windows Phone",
        "Windows Mobile",
        "Windows CE",
        "BlackBerry OS",
        "BlackBerry Tablet OS",
        "Symbian OS",
        "Firefox OS",
        "KaiOS",
        "Tizen",
        "Sailfish",
        "webOS",
        "Bada",
        "Maemo",
        "HarmonyOS",
    }
)
_DESKTOP_OS: Final = frozenset(
    {
        "Mac OS X",
        "Mac OS",
        "Chrome OS",
        "Linux",
        "Ubuntu",
        "Debian",
        "Fedora",
        "Red Hat",
        "CentOS",
        "SUSE",
        "openSUSE",
        "Mint",
        "Arch Linux",
        "Gentoo",
        "Slackware",
        "Mandriva",
        "FreeBSD",
        "OpenBSD",
        "NetBSD",
        "Solaris",
    }
)


def classify_device(user_agent: str) -> str:
    """Device class of a user agent: "mobile", "desktop", "tablet" or "unknown".

    Uncached (one ua-parser parse, tens of microseconds); callers put an LRU cache in front.
    """
    if not user_agent or user_agent.isspace():
        return UNKNOWN
    result = ua_parser.parse(user_agent)
    device = result.device.family if result.device is not None else ""
    os = result.os.family if result.os is not None else ""
    if device == "Spider":
        return UNKNOWN
    if (
        device in _TABLET_DEVICES
        or device.startswith("Kindle")
        or "Tablet" in user_agent
        or "iPad" in user_agent
        # Android tablets leave out the "Mobile" token that Android phones send.
        or (os == "Android" and "Mobile" not in user_agent)
    ):
        return TABLET
    if device in _MOBILE_DEVICES or os in _MOBILE_OS or "Mobile" in user_agent:
        return MOBILE
    if os in _DESKTOP_OS or os.startswith("Windows") or device == "Mac":
        return DESKTOP
    return UNKNOWN
