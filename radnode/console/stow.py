"""DICOMweb STOW-RS ingress (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]`` with a
``multipart/related; type="application/dicom"`` body, one Part 10 instance per part.

The body is streamed (python-multipart's parser) to a temporary file per part under the spool's
``.incoming`` folder (a crash leaves ``.part`` files the next start removes), never held whole in memory; each instance then goes through the same
:class:`radnode.node.scp.Ingest` as a C-STORE (same spool, refusals, routing, job store). A request is one
"association" for study completeness: its end releases the series it carried, as an A-RELEASE does.
The sender is recorded as calling AE ``STOW`` with the caller's address; the caller (token or person) is
in the job's first event through the association id ``stow-<name>-<id>``.

The answer is the PS3.18 Store Instances Response Module as DICOM JSON: 200 when every instance was stored,
202 when some failed (each in the Failed SOP Sequence with its reason), 409 when none was.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Protocol

from fastapi import APIRouter, HTTPException, Path as PathParam, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from python_multipart.multipart import MultipartParser, parse_options_header

from radnode.console.auth import Operator, client_address
from radnode.console.schemas import StowResult

log = logging.getLogger(__name__)

STOW_CALLING_AE = "STOW"
"""The calling AE title recorded for instances that came over STOW-RS (rules may route on it)."""

_CANNOT_UNDERSTAND = 0xC000
_OUT_OF_RESOURCES = 0xA700
_UID = r"^[0-9]+(\.[0-9]+)*$"


class StowIngest(Protocol):
    """What STOW-RS hands instances to (:class:`radnode.node.service.Node`)."""

    def stow_receive(self, path: Path, calling_ae: str, peer_address: str, association_id: str,
                     study: str | None) -> str:
        """Ingest one Part 10 file (of ``study`` when given); returns its SOP Instance UID, raises ValueError
        (refused, the reason in words) or OSError (cannot be stored now)."""

    def stow_released(self, association_id: str) -> None:
        """The request is over: its series may be complete."""

    def stow_incoming(self) -> Path:
        """A folder for the parts being received (on the spool's file system)."""


class _Parts:
    """python-multipart callbacks writing each part's body to its own temporary file."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self.files: list[tuple[Path, str]] = []
        self._file = None
        self._header_field = b""
        self._header_value = b""
        self._content_type = ""
        self._size = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
                "on_header_field": self._field, "on_header_value": self._value, "on_header_end": self._header_end}

    def _begin(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.folder, suffix=".part")
        self._file = open(fd, "wb")
        self.files.append((Path(name), ""))
        self._content_type = ""

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-type":
            self._content_type = self._header_value.decode("latin-1").split(";")[0].strip().lower()
            self.files[-1] = (self.files[-1][0], self._content_type)
        self._header_field = self._header_value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size > self.limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"request larger than {self.limit // 2**20} MB")
        assert self._file is not None
        self._file.write(data[start:end])

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self._end()
        for path, _ in self.files:
            path.unlink(missing_ok=True)


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/related":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            'expected Content-Type: multipart/related; type="application/dicom"; boundary=…')
    part_type = options.get(b"type", b"application/dicom").lower()
    if part_type != b"application/dicom":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"parts of type {part_type.decode('latin-1')!r}: only application/dicom is accepted")
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "multipart/related without a boundary")
    return boundary


def _sop(uid: str | None, status_code: int | None = None, reason: str | None = None) -> dict:
    item: dict = {}
    if uid:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    if status_code is not None:
        item["00081197"] = {"vr": "US", "Value": [status_code]}
    if reason:
        item["00090010"] = {"vr": "LO", "Value": ["RADNODE"]}
        item["00091001"] = {"vr": "LT", "Value": [reason[:10240]]}  # private: the reason in words
    return item


router = APIRouter(tags=["dicomweb"])

_STOW_RESPONSES = {
    200: {"description": "every instance stored (DICOM JSON Store Instances Response)", "model": StowResult},
    202: {"description": "some instances failed, each named in the Failed SOP Sequence"},
    409: {"description": "no instance could be stored"},
    413: {"description": "request larger than api.max_upload_mb"},
    415: {"description": "not multipart/related with application/dicom parts"},
}


async def _stow(request: Request, identity: Operator, study: str | None) -> JSONResponse:
    node: StowIngest = request.app.state.node
    boundary = _boundary(request)
    parts = _Parts(node.stow_incoming(), request.app.state.max_upload_bytes)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        parts.discard()
        raise
    except Exception as e:  # a body python-multipart cannot parse
        parts.discard()
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed multipart body: {e}") from None
    association = f"stow-{identity.name}-{uuid.uuid4().hex[:12]}"
    peer = f"{client_address(request) or ''}:{request.client.port if request.client else 0}"
    stored: list[dict] = []
    failed: list[dict] = []
    try:
        for path, content_type in parts.files:
            if content_type not in ("", "application/dicom"):
                failed.append(_sop(None, _CANNOT_UNDERSTAND, f"part of type {content_type!r}: expected application/dicom"))
                continue
            try:
                uid = await run_in_threadpool(node.stow_receive, path, STOW_CALLING_AE, peer, association, study)
                stored.append(_sop(uid))
            except ValueError as e:
                failed.append(_sop(getattr(e, "sop_instance_uid", None), _CANNOT_UNDERSTAND, str(e)))
            except OSError as e:
                failed.append(_sop(None, _OUT_OF_RESOURCES, f"cannot store: {e.strerror or e}"))
    finally:
        parts.discard()
        if stored:
            await run_in_threadpool(node.stow_released, association)
    log.info("STOW-RS from %s (%s): %d stored, %d refused", identity.label, peer, len(stored), len(failed))
    body: dict = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    code = status.HTTP_200_OK if not failed else status.HTTP_202_ACCEPTED if stored else status.HTTP_409_CONFLICT
    if not parts.files:
        code = status.HTTP_400_BAD_REQUEST
        body = {"detail": "the multipart body holds no part"}
    return JSONResponse(body, status_code=code, media_type="application/dicom+json")


@router.post("/dicom-web/studies", summary="STOW-RS: store instances (any study)", responses=_STOW_RESPONSES,
             openapi_extra={"requestBody": {"required": True, "content": {
                 'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}})
async def stow_studies(request: Request, identity: Operator) -> JSONResponse:
    return await _stow(request, identity, None)


@router.post("/dicom-web/studies/{study}", summary="STOW-RS: store instances of one study",
             responses=_STOW_RESPONSES,
             openapi_extra={"requestBody": {"required": True, "content": {
                 'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}})
async def stow_study(request: Request, identity: Operator,
                     study: Annotated[str, PathParam(pattern=_UID, max_length=64)]) -> JSONResponse:
    return await _stow(request, identity, study)
