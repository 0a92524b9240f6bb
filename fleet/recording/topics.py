"""Topics and topic filters: which messages are windows or samples, which filters to subscribe."""

from __future__ import annotations

import logging

logger = logging.getLogger("fleet.recording")


def is_window_topic(topic: str) -> bool:
    """True for `*/window` topics (the last level is `window`)."""
    return _last_level(topic) == "window"


def is_samples_topic(topic: str) -> bool:
    """True for `*/samples` topics."""
    return _last_level(topic) == "samples"


def _last_level(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]


def subscription_filters(topics: list[str]) -> list[str]:
    """The filters worth subscribing to: duplicates and filters inside another one dropped.

    A broker may deliver a message once per matching subscription (mosquitto 2 does), so
    `imu/s1/window` next to `imu/+/window` would record every s1 window twice. Filters that only
    partly overlap cannot be merged; a warning says so.
    """
    kept: list[str] = []
    for i, topic_filter in enumerate(topics):
        others = [o for j, o in enumerate(topics) if j != i]
        wider = [o for o in others if o != topic_filter and _covers(o, topic_filter)]
        if wider or topic_filter in kept:
            logger.info(
                "not subscribing %s separately: %s covers it",
                topic_filter,
                wider[0] if wider else "the same filter",
            )
            continue
        kept.append(topic_filter)
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            if _overlap(a, b):
                logger.warning(
                    "topic filters %s and %s overlap: the broker may deliver a message matching "
                    "both twice, and the recording would hold it twice",
                    a,
                    b,
                )
    return kept


def _covers(wide: str, narrow: str) -> bool:
    """True when every topic matching filter `narrow` also matches filter `wide`."""
    wide_levels, narrow_levels = wide.split("/"), narrow.split("/")
    if narrow_levels[0].startswith("$") and wide_levels[0] in {"+", "#"}:
        return False  # wildcards at the first level never match $SYS-style topics
    for i, level in enumerate(wide_levels):
        if level == "#":
            return True
        if i >= len(narrow_levels):
            return False
        other = narrow_levels[i]
        if other == "#" or (level != "+" and (other == "+" or other != level)):
            return False
    return len(narrow_levels) == len(wide_levels)


def _overlap(a: str, b: str) -> bool:
    """True when some topic matches both filters."""
    a_levels, b_levels = a.split("/"), b.split("/")
    for i in range(max(len(a_levels), len(b_levels))):
        x = a_levels[i] if i < len(a_levels) else None
        y = b_levels[i] if i < len(b_levels) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True
