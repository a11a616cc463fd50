"""Validation of audit messages against the DICOM Audit Message schema itself (PS3.15 A.5.1.1).

``standard/audit-message.rnc`` is the standard's RELAX NG Compact schema as published (see
``standard/SOURCES.md``); lxml compiles it (through ``rnc2rng``) into libxml2's RELAX NG validator. Nothing
here knows how radnode writes its messages: a message is valid when the standard's grammar accepts it.

One mechanical change is made on loading, not in the file: the standard puts ``##`` documentation comments
after the last value of a choice (``"E"  ## Execute`` before ``}``), where RELAX NG Compact allows none, so
jing and rnc2rng both refuse the text as published; read as plain ``#`` comments, which is what they are, the
grammar is unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from lxml import etree

SCHEMA = "audit-message.rnc"


@lru_cache(maxsize=1)
def audit_schema() -> etree.RelaxNG:
    """The compiled PS3.15 A.5.1 schema."""
    return etree.RelaxNG.from_rnc_string(schema_text())


def schema_text() -> str:
    """The standard's schema text with its documentation comments read as comments (see above)."""
    return resources.files("radnode.security").joinpath("standard", SCHEMA).read_text().replace("##", "#")


def schema_errors(message: str | bytes) -> list[str]:
    """Why ``message`` is not a valid DICOM audit message (empty when it is)."""
    try:
        document = etree.fromstring(message.encode() if isinstance(message, str) else message)
    except etree.XMLSyntaxError as e:
        return [f"not well-formed XML: {e}"]
    schema = audit_schema()
    if schema.validate(document):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]  # type: ignore[attr-defined]
