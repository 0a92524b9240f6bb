"""Semantic version ordering (MAJOR.MINOR.PATCH[-pre][+build]), per semver.org section 11."""

from __future__ import annotations

from schemas.manifest import SEMVER

SortKey = tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]


def version_key(version: str) -> SortKey:
    """A key that sorts versions by precedence; ValueError for a non-semantic version."""
    match = SEMVER.match(version)
    if match is None:
        msg = f"{version!r} is not a semantic version"
        raise ValueError(msg)
    major, minor, patch = (int(g) for g in match.groups()[:3])
    core = version.split("+", 1)[0]
    pre = core.split("-", 1)[1] if "-" in core else ""
    if not pre:  # a release ranks above all of its pre-releases
        return (major, minor, patch, 1, ())
    fields = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (major, minor, patch, 0, fields)


def is_older(candidate: str, than: str) -> bool:
    """True when `candidate` has lower precedence than `than`."""
    return version_key(candidate) < version_key(than)
