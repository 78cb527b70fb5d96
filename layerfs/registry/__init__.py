"""The registry client: wire protocol, auth, credentials, manifests, platforms."""
