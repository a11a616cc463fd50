"""Egress: a finished job's results go to the outbox, its DICOM destinations and the FHIR server.

Every (job, destination, object) is a delivery row; a delivery recorded as done is never attempted
again, one that fails is retried with exponential back-off until ``egress.max_attempts``. The job is
``done`` when all deliveries are done, ``failed`` (results kept in the outbox) when some gave up.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from radnode.config import Config, DicomPeer
from radnode.node.store import Delivery, JobStore

log = logging.getLogger(__name__)

FHIR_BUNDLE = "fhir-bundle.json"
DICOM_PREFIX = "dicom:"
FHIR_PREFIX = "fhir:"
ORTHANC = "orthanc"
"""Destination: store into the configured Orthanc (``POST /instances``)."""
ORTHANC_MODALITY = "orthanc-modality:"
"""Destination prefix: store into Orthanc, then have Orthanc C-STORE to one of its modalities."""
ORTHANC_DICOMWEB = "orthanc-dicomweb:"
"""Destination prefix: store into Orthanc, then have Orthanc STOW-RS to one of its DICOMweb servers."""


def outbox_dir(config: Config, job_id: int) -> Path:
    """``data_dir/outbox/<job_id>``: every output of the job, whatever happens to the deliveries."""
    return config.data_dir / "outbox" / str(job_id)


def _copy_durably(source: Path, target: Path) -> list[str]:
    """Replace ``target`` by a copy of the files in ``source``, fsync'd; returns the file names."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    for name in names:
        shutil.copyfile(source / name, staging / name)
        with open(staging / name, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return names


class Egress:
    """Plans a job's deliveries and carries out those that are due."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store

    def dicom_destinations(self, calling_ae: str) -> list[DicomPeer]:
        """The configured destinations plus, with return-to-sender, the calling AE if it is a known peer."""
        peers = list(self.config.egress.destinations)
        if self.config.egress.return_to_sender:
            peers += [p for p in self.config.egress.known_peers if p.ae_title == calling_ae]
        unique: dict[str, DicomPeer] = {str(p): p for p in peers}
        return list(unique.values())

    def named_destination(self, name: str) -> str:
        """The delivery destination for a name the routing rules use in ``forward:``."""
        target = self.config.egress.named_destinations.get(name)
        if target is None:
            raise KeyError(f"forward destination {name!r} is not in egress.named_destinations")
        if target.startswith((ORTHANC_MODALITY, ORTHANC_DICOMWEB)):
            return target
        return f"{DICOM_PREFIX}{DicomPeer.parse(target)}"

    def stage(self, job_id: int, outputs: Path) -> None:
        """Copy a finished run's outputs to the outbox and move the job to ``delivering`` with its deliveries.

        Results go to the configured destinations, back to Orthanc and to the study's route ``forward``
        destinations; a forward-only job (no pipeline) sends the study itself to its forwards only.
        """
        job = self.store.job(job_id)
        if job is None:
            return
        try:
            names = _copy_durably(outputs, outbox_dir(self.config, job_id))
            forwards = [self.named_destination(name) for name in job.forwards]
        except (OSError, KeyError) as e:
            self.store.fail_job(job_id, f"cannot stage the results: {e}")
            return
        dicom = [n for n in names if n.endswith(".dcm")]
        if job.pipeline:
            targets = [f"{DICOM_PREFIX}{peer}" for peer in self.dicom_destinations(job.calling_ae)]
            targets += [ORTHANC] if self.config.orthanc.url and self.config.orthanc.results_to_orthanc else []
        else:
            targets = []
        targets = list(dict.fromkeys(targets + forwards))
        plan = [(target, name) for target in targets for name in dicom]
        if job.pipeline and self.config.egress.fhir_url and FHIR_BUNDLE in names:
            plan.append((f"{FHIR_PREFIX}{self.config.egress.fhir_url}", FHIR_BUNDLE))
        summary = (f"{len(names)} outputs ({len(dicom)} DICOM) copied to the outbox; "
                   f"{len(plan)} deliveries planned")
        self.store.begin_delivery(job_id, summary, plan)

    def deliver_due(self) -> None:
        """Attempt every due delivery, one association (or request) per job and destination."""
        groups: dict[tuple[int, str], list[Delivery]] = defaultdict(list)
        for delivery in self.store.due_deliveries():
            groups[(delivery.job_id, delivery.destination)].append(delivery)
        for (job_id, destination), deliveries in groups.items():
            folder = outbox_dir(self.config, job_id)
            if destination.startswith(DICOM_PREFIX):
                self._send_dicom(DicomPeer.parse(destination.removeprefix(DICOM_PREFIX)), folder, deliveries)
            elif destination == ORTHANC or destination.startswith((ORTHANC_MODALITY, ORTHANC_DICOMWEB)):
                self._send_orthanc(destination, folder, deliveries)
            else:
                self._post_fhir(destination.removeprefix(FHIR_PREFIX), folder, deliveries)
        for job_id in {job_id for job_id, _ in groups}:
            state = self.store.settle_job(job_id)
            if state is not None:
                log.debug("job %d %s", job_id, state)

    def _failed(self, delivery: Delivery, error: str) -> None:
        egress = self.config.egress
        self.store.delivery_failed(delivery.id, error, egress.max_attempts,
                                   (egress.retry_initial_seconds, egress.retry_max_seconds))

    def _send_dicom(self, peer: DicomPeer, folder: Path, deliveries: list[Delivery]) -> None:
        """C-STORE each object over one association; each success is recorded the moment it is confirmed."""
        syntaxes: dict[str, set[UID]] = defaultdict(set)
        readable = []
        for delivery in deliveries:
            try:
                meta = pydicom.dcmread(folder / delivery.object, stop_before_pixels=True,
                                       specific_tags=["SOPClassUID"])
                ts = meta.file_meta.TransferSyntaxUID
                sop_class = meta.SOPClassUID
            except (OSError, InvalidDicomError, AttributeError) as e:
                self._failed(delivery, f"cannot read {delivery.object} from the outbox: {e}")
                continue
            syntaxes[sop_class] |= {ts} if ts.is_compressed else {ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian}
            readable.append(delivery)
        if not readable:
            return
        deliveries = readable
        ae = AE(ae_title=self.config.ingress.ae_title)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, timeout, self.config.egress.timeout_seconds)
        ae.connection_timeout = self.config.egress.timeout_seconds
        for sop_class, transfer_syntaxes in syntaxes.items():
            ae.add_requested_context(sop_class, sorted(transfer_syntaxes))
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            for delivery in deliveries:
                self._failed(delivery, f"association with {peer} {why}")
            return
        try:
            for delivery in deliveries:
                self._store_one(assoc, peer, folder, delivery)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_one(self, assoc: Association, peer: DicomPeer, folder: Path, delivery: Delivery) -> None:
        if not assoc.is_established:
            self._failed(delivery, f"association with {peer} ended early")
            return
        try:
            status = assoc.send_c_store(folder / delivery.object)
        except (ValueError, RuntimeError, OSError) as e:
            self._failed(delivery, f"cannot send: {e}")
            return
        code = status.get("Status") if status else None
        if code is not None and (code == 0 or code & 0xF000 == 0xB000):
            self.store.delivery_done(delivery.id, f"{delivery.object} → {peer} (status 0x{code:04X})")
        elif code is None:
            self._failed(delivery, f"no response from {peer}")
        else:
            comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
            self._failed(delivery, f"{peer} answered status 0x{code:04X}{comment}")

    def _orthanc(self, method: str, path: str, **kwargs: object) -> requests.Response:
        """A request to the configured Orthanc's REST API; raises for HTTP errors."""
        orthanc = self.config.orthanc
        if not orthanc.url:
            raise requests.RequestException("orthanc.url is not configured")
        auth = (orthanc.username, orthanc.password) if orthanc.username else None
        response = requests.request(method, f"{orthanc.url}{path}", auth=auth,
                                    timeout=self.config.egress.timeout_seconds, **kwargs)  # type: ignore[arg-type]
        if response.status_code >= 400:
            raise requests.RequestException(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return response

    def _send_orthanc(self, destination: str, folder: Path, deliveries: list[Delivery]) -> None:
        """Store each object into Orthanc (``POST /instances``); for a modality or DICOMweb server Orthanc
        then sends them all in one synchronous job, and they are done only when that succeeded."""
        stored: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                answer = self._orthanc("POST", "/instances", data=(folder / delivery.object).read_bytes(),
                                       headers={"Content-Type": "application/dicom"}).json()
                stored.append((delivery, answer["ID"]))
            except (requests.RequestException, OSError, ValueError, KeyError) as e:
                self._failed(delivery, f"store into Orthanc: {e}")
        if destination == ORTHANC:
            for delivery, orthanc_id in stored:
                self.store.delivery_done(delivery.id, f"{delivery.object} → Orthanc (instance {orthanc_id})")
            return
        if not stored:
            return
        if destination.startswith(ORTHANC_MODALITY):
            path = f"/modalities/{destination.removeprefix(ORTHANC_MODALITY)}/store"
        else:
            path = f"/dicom-web/servers/{destination.removeprefix(ORTHANC_DICOMWEB)}/stow"
        try:
            self._orthanc("POST", path, json={"Resources": [i for _, i in stored], "Synchronous": True})
        except requests.RequestException as e:
            for delivery, _ in stored:
                self._failed(delivery, f"Orthanc {path}: {e}")
            return
        for delivery, _ in stored:
            self.store.delivery_done(delivery.id, f"{delivery.object} → {destination} via Orthanc")

    def _post_fhir(self, url: str, folder: Path, deliveries: list[Delivery]) -> None:
        """POST each Bundle as application/fhir+json; any 2xx answer is a delivery."""
        for delivery in deliveries:
            try:
                response = requests.post(url, data=(folder / delivery.object).read_bytes(),
                                         headers={"Content-Type": "application/fhir+json",
                                                  "Accept": "application/fhir+json"},
                                         timeout=self.config.egress.timeout_seconds)
            except (requests.RequestException, OSError) as e:
                self._failed(delivery, f"POST {url}: {type(e).__name__}: {e}")
                continue
            if 200 <= response.status_code < 300:
                self.store.delivery_done(delivery.id, f"{delivery.object} → {url} (HTTP {response.status_code})")
            else:
                self._failed(delivery, f"POST {url}: HTTP {response.status_code} {response.text[:200]}")
