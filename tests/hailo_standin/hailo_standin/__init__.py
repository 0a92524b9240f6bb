"""Test-only helpers behind the Hailo stand-ins: the stand-in HEF format and fault injection."""
