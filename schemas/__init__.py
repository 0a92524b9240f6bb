"""Wire contract of the IMU edge system: topic names, message models and their codecs.

Everything a sensor, dashboard or operator script depends on lives here, in one place:
`schemas.topics` (the topic tree), `schemas.messages` (pydantic models of every payload),
`schemas.manifest` (the model bundle manifest) and `schemas.codec` (bytes <-> messages, including
the fast window decoder used on the node's hot path).
"""

from typing import Final

SCHEMA_VERSION: Final = 1
"""Version of the wire contract; bumped (with a note in docs/) on any incompatible change."""
