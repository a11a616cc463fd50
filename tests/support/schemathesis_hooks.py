"""Schemathesis hooks for the node's OpenAPI (``SCHEMATHESIS_HOOKS=support.schemathesis_hooks``): STOW-RS bodies
(multipart/related of application/dicom) are sent as the raw bytes generated for them."""

import schemathesis


@schemathesis.serializer('multipart/related; type="application/dicom"', "multipart/related")
def raw_bytes(ctx, value):  # type: ignore[no-untyped-def]
    return value if isinstance(value, bytes) else str(value).encode()
