"""The destination types and the one grammar that names a destination.

Every module of this package that defines a :class:`~radnode.destinations.base.Destination` subclass decorated
with :func:`destination_type` is a type; :func:`destination_types` imports them all, so a new type is one new
file. A destination is written as a mapping with ``type:`` or as one line:

- ``TYPE:ARGUMENT`` — ``dicom:PACS@10.0.0.5:104``, ``fhir:https://ehr/fhir``, ``orthanc-modality:PACS``, ...
- ``AET@HOST:PORT`` — a DICOM C-STORE destination (the command line's ``--destination``)
- ``TYPE`` alone for a type whose one-line form needs no argument (``orthanc``)

An unknown type is refused with the known ones listed; nothing falls through to another type.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from radnode.destinations.base import Destination, DestinationError
from radnode.security.secrets import INVALID_SECRET

_TYPES: dict[str, type[Destination]] = {}
_LOADED = False
_DICOM_ADDRESS = re.compile(r"[^@:/\s]{1,16}@[^@\s]+:\d{1,5}")

D = TypeVar("D", bound=type[Destination])


def destination_type(cls: D) -> D:
    """Class decorator: register a destination type under its ``kind``."""
    if cls.kind in _TYPES and _TYPES[cls.kind] is not cls:
        raise RuntimeError(f"destination type '{cls.kind}' is registered twice ({_TYPES[cls.kind]} and {cls})")
    _TYPES[cls.kind] = cls
    return cls


def destination_types() -> dict[str, type[Destination]]:
    """Every destination type by name, sorted; the package's modules are imported on first use."""
    global _LOADED
    if not _LOADED:
        import radnode.destinations as package

        for module in pkgutil.iter_modules(package.__path__):
            if module.name not in ("base", "registry", "credentials"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        _LOADED = True
    return dict(sorted(_TYPES.items()))


def known_types() -> str:
    """The type names, comma-separated, for error messages."""
    return ", ".join(destination_types())


def unknown_type(name: str) -> DestinationError:
    """The one error for a type nobody registered."""
    return DestinationError(f"unknown destination type '{name}' (known: {known_types()})", key="type")


def as_mapping(value: Any) -> dict[str, Any]:
    """A destination's mapping form: a mapping is checked for a known ``type``, a string is the one-line form.

    A mapping without ``type`` holding ``ae_title``/``host``/``port`` is the old list form of DICOM
    destinations and means ``type: dicom``.
    """
    types = destination_types()
    if isinstance(value, Mapping):
        data = dict(value)
        if "type" not in data:
            if {"ae_title", "host", "port"} <= data.keys():
                return {"type": "dicom", **data}
            raise DestinationError(f"missing 'type' (one of: {known_types()})", key="type")
        if not isinstance(data["type"], str) or data["type"] not in types:
            raise unknown_type(str(data["type"]))
        return data
    if not isinstance(value, str) or not value.strip():
        raise DestinationError(f"expected a mapping with 'type' or a one-line destination such as "
                               f"PACS@10.0.0.5:104 or dicomweb:https://host/dicom-web, got {value!r}")
    text = value.strip()
    if _DICOM_ADDRESS.fullmatch(text):
        return {"type": "dicom", **types["dicom"].shorthand(text)}
    name, colon, argument = text.partition(":")
    if name not in types:
        if not colon and "@" not in text:
            raise DestinationError(f"'{text}' is neither AET@HOST:PORT nor TYPE:ARGUMENT (known types: "
                                   f"{known_types()})", key="type")
        raise unknown_type(name)
    return {"type": name, **types[name].shorthand(argument)}


def looks_like_destination(text: str) -> bool:
    """Whether a name is written as a one-line destination rather than a configured destination's name."""
    return ":" in text or "@" in text


def parse_destination(value: Any) -> Destination:
    """A destination from its mapping or one-line form; :class:`DestinationError` names the key at fault."""
    data = as_mapping(value)
    try:
        return destination_types()[data["type"]].model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise DestinationError(f"unknown key '{key}' for a {data['type']} destination", key=key) from None
        if err["type"] == "value_error":  # a validator's own words; the input may hold what should not be echoed
            raise DestinationError(str(err["ctx"]["error"]), key=key) from None
        if err["type"] == INVALID_SECRET:  # the input may be the secret itself
            raise DestinationError(err["msg"], key=key) from None
        raise DestinationError(f"{err['msg']} (got {err.get('input')!r})", key=key) from None
