"""The MQTT session and connection settings every client of the system uses."""
