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
from typing import TYPE_CHECKING

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from radnode.config import Config, DicomPeer
from radnode.node.store import Delivery, JobStore

if TYPE_CHECKING:
    from radnode.security.audit import AuditTrail
    from radnode.security.privacy import SiteKey

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

    def __init__(self, config: Config, store: JobStore, audit: "AuditTrail | None" = None) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        """Told of every job whose deliveries have settled (DICOM Instances Transferred / Export messages)."""
        self.site_key: SiteKey | None = audit.site_key if audit is not None else None
        """For de-identified forwards (``egress.deidentify``): UIDs and pseudonyms under the site's key."""

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
        profiles = {target: self.config.egress.deidentify[name] for name, target in zip(job.forwards, forwards)
                    if name in self.config.egress.deidentify}
        targets = list(dict.fromkeys(targets + forwards))
        plan = [(target, name) for target in targets if target not in profiles for name in dicom]
        notes = []
        for profile in dict.fromkeys(profiles.values()):
            staged, refused = self._deidentified(job_id, profile, dicom)
            plan += [(target, name) for target, p in profiles.items() if p == profile for name in staged]
            notes += [f"not forwarded ({profile} de-identification refused {name}): {why}"
                      for name, why in refused.items()]
        if job.pipeline and self.config.egress.fhir_url and FHIR_BUNDLE in names:
            plan.append((f"{FHIR_PREFIX}{self.config.egress.fhir_url}", FHIR_BUNDLE))
        summary = "; ".join([f"{len(names)} outputs ({len(dicom)} DICOM) copied to the outbox",
                             f"{len(plan)} deliveries planned", *notes])
        self.store.begin_delivery(job_id, summary, plan)

    def _deidentified(self, job_id: int, profile: str, names: list[str]) -> tuple[list[str], dict[str, str]]:
        """De-identified copies of the outbox's DICOM files in ``outbox/<job>/deid-<profile>/`` (once per job and
        profile; a restart reuses them): the delivery objects to plan, and the refused files with the reason."""
        from radnode.security.deid import deidentifier_for, deidentify_folder
        from radnode.security.privacy import SiteKey

        folder = outbox_dir(self.config, job_id)
        target = folder / f"deid-{profile}"
        if self.site_key is None:
            self.site_key = SiteKey.load(self.config.privacy.site_key, self.config.data_dir)
        staging = folder / f".deid-{profile}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        source = folder / f".deid-{profile}.source"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        for name in names:
            os.link(folder / name, source / name)
        outcome = deidentify_folder(source, staging, deidentifier_for(self.config, profile, self.site_key))
        shutil.rmtree(source)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return ([f"{target.name}/{p.name}" for p in outcome.written],
                {path.name: why for path, why in outcome.refused.items()})

    def deliver_due(self) -> None:
        """Attempt every due delivery, one association (or request) per job and destination."""
        groups: dict[tuple[int, str], list[Delivery]] = defaultdict(list)
        for delivery in self.store.due_deliveries():
            groups[(delivery.job_id, delivery.destination)].append(delivery)
        for (job_id, destination), deliveries in groups.items():
            folder = outbox_dir(self.config, job_id)
            if destination.startswith(DICOM_PREFIX):
                self._send_dicom(self._configured_peer(destination.removeprefix(DICOM_PREFIX)), folder, deliveries)
            elif destination == ORTHANC or destination.startswith((ORTHANC_MODALITY, ORTHANC_DICOMWEB)):
                self._send_orthanc(destination, folder, deliveries)
            else:
                self._post_fhir(destination.removeprefix(FHIR_PREFIX), folder, deliveries)
        for job_id in {job_id for job_id, _ in groups}:
            state = self.store.settle_job(job_id)
            if state is not None:
                log.info("job %d %s", job_id, state)
                if self.audit is not None:
                    self._audit_settled(job_id)

    def _audit_settled(self, job_id: int) -> None:
        """The audit trail's record of what the job sent where (see :func:`audit_job_deliveries`)."""
        from radnode.security.audit import audit_job_deliveries

        job = self.store.job(job_id)
        if job is None or self.audit is None:
            return
        folder = outbox_dir(self.config, job_id)
        sop_classes: dict[str, str] = {}
        for path in folder.glob("*.dcm"):
            try:
                sop_classes[path.name] = str(pydicom.dcmread(path, stop_before_pixels=True,
                                                             specific_tags=["SOPClassUID"]).SOPClassUID)
            except (OSError, InvalidDicomError, AttributeError):
                continue
        exports = []
        for name in job.forwards:
            try:
                exports.append(self.named_destination(name))
            except KeyError:
                continue
        for profile_folder in folder.glob("deid-*"):
            for path in profile_folder.glob("*.dcm"):
                try:
                    sop_classes[f"{profile_folder.name}/{path.name}"] = str(pydicom.dcmread(
                        path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
                except (OSError, InvalidDicomError, AttributeError):
                    continue
        deidentified = [self.named_destination(n) for n in job.forwards if n in self.config.egress.deidentify]
        audit_job_deliveries(self.audit, job.study_instance_uid, job.patient_id or None, self.store.deliveries(job_id),
                             sop_classes, exports, deidentified)

    def _configured_peer(self, address: str) -> DicomPeer:
        """The configured peer (with its TLS settings) a delivery's ``AET@HOST:PORT`` names."""
        egress = self.config.egress
        for peer in (*egress.destinations, *egress.known_peers):
            if str(peer) == address:
                return peer
        return DicomPeer.parse(address)

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
        tls_args = None
        if peer.tls is not None:
            from radnode.security.tls import TlsSetupError, client_context

            try:
                tls_args = (client_context(peer.tls, f"destination {peer}"), peer.host)
            except TlsSetupError as e:
                for delivery in deliveries:
                    self._failed(delivery, str(e))
                return
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            why += " (TLS)" if tls_args else ""
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
        auth = (orthanc.username, orthanc.password.reveal() if orthanc.password else "") if orthanc.username else None
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
