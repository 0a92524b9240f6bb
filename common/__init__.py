"""What the node and the fleet tools both need, in one place both import.

- `common.mqtt.connection`: broker address, connection settings (flags, env, TOML) and logins;
- `common.mqtt.session`: the long-lived, reconnecting MQTT session every client uses;
- `common.bundle`: the model bundle format (read, verify, write);
- `common.signing`: Ed25519 keys, signed manifests and desired states, trusted key stores;
- `common.errors`: the root of every error raised on purpose, and the bundle errors.

`schemas/` (the wire contract) imports none of this; node and fleet import it, not each other's
insides, for these jobs.
"""
