"""Stand-in for the compiled `_pyhailort` module: its version and its raw C++ exceptions.

In HailoRT 4.x the C++ layer throws `_pyhailort.HailoRTStatusException`, whose `args[0]` is the
status code as a string; the Python `ExceptionWrapper` translates it into a `HailoRT*` class, but
some calls are not wrapped and leak it raw (hailo-notes.md section 1). These classes are NOT
subclasses of the Python `pyhailort.HailoRTException`, as in 4.x. `__version__` is checked by
`hailo_platform/__init__` (the fault `pyhailort_version` makes it differ, as a broken install).
"""

from __future__ import annotations

from hailo_standin import faults

__version__ = faults.current().pyhailort_version or "4.23.0"


class HailoRTException(Exception):  # noqa: N818 (the real name)
    """`_pyhailort.HailoRTException` (C++), unrelated to the Python class of the same name."""


class HailoRTCustomException(HailoRTException):
    """`_pyhailort.HailoRTCustomException`."""


class HailoRTStatusException(HailoRTException):
    """`_pyhailort.HailoRTStatusException`: `args[0]` is the status code, as a string."""


def raw_status(code: int) -> HailoRTStatusException:
    """The raw exception an unwrapped call leaks for `code`."""
    return HailoRTStatusException(str(code))
