"""What the tests share besides fixtures: MQTT probes, waiting, ids, programs, nodes' settings.

Fixtures stay in tests/conftest.py; everything a test imports by name lives here.
"""
