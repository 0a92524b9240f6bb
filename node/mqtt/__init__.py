"""Results leaving the node safely: the outbox (to the session while connected), the disk spool
(while not) and the journal of results in flight (republished after a crash). The MQTT session
itself is shared with the fleet tools: common/mqtt/."""
