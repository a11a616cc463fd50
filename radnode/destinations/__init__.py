"""Where results go: a registry of destination types, one module each (mercure's ``target_types`` shape, with
the settings model and the sender in the same class, so a new type is one file).

``registry.py`` holds the one grammar (a mapping with ``type:`` or a one-line ``TYPE:ARGUMENT``) and refuses an
unknown type with the known ones; ``base.py`` the shared model (timeouts, items, outcomes); ``credentials.py`` the
secrets of HTTP types. Egress (``radnode/node/egress.py``) queues, retries and records; types only send.
"""

from radnode.destinations.base import (
    FHIR_BUNDLE,
    Check,
    Destination,
    DestinationError,
    Item,
    Outcome,
    SendContext,
    TimeoutOverrides,
    Timeouts,
)
from radnode.destinations.registry import (
    as_mapping,
    destination_type,
    destination_types,
    known_types,
    looks_like_destination,
    parse_destination,
)

__all__ = ["FHIR_BUNDLE", "Check", "Destination", "DestinationError", "Item", "Outcome", "SendContext", "TimeoutOverrides",
           "Timeouts", "as_mapping", "destination_type", "destination_types", "known_types",
           "looks_like_destination", "parse_destination"]
