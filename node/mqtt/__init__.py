"""The node's one MQTT session: connect, reconnect, subscribe, publish."""
