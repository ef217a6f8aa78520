"""Schemathesis hooks for the API fuzzing test: plugin uploads are raw
`application/wasm` bytes, which Schemathesis cannot serialise by itself."""

import schemathesis


@schemathesis.serializer("application/wasm")
def wasm(ctx, value):
    if isinstance(value, bytes):
        return value
    return str(value).encode()
