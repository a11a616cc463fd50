"""The IHE ATNA audit trail: DICOM PS3.15 A.5 audit messages, to an append-only local log and to syslog.

Messages follow the DICOM Audit Message schema (``standard/audit-message.rnc``, PS3.15 A.5.1, checked by
:mod:`radnode.security.audit_schema`) and the specialisations of A.5.3:

==============================  ==============================================================
Application Activity (110100)   node start and stop
DICOM Instances Transferred     every study received (per association) and every send of results
(110104)                        (per job and destination and attempt, failed ones included)
Begin Transferring (110102)     a job's deliveries start
Instances Accessed (110103)     a job ran a site model folder on a study (each folder's content hash)
Export (110106)                 a study or results leave for a forward or de-identified destination
Query (110112)                  a C-FIND answered (none yet: the node offers no query service)
Security Alert (110113)         a rejected association, a failed TLS handshake, a refused API call, a
                                pipeline's drift alert (type ``RADNODE-DRIFT``, 99RADNODE: the attribute and PSI)
User Authentication (110114)    a person's login or logout at the console
Security Alert (110113)         a console account or API token added, removed or changed (type User Security
                                Attributes Changed, 110137: ``radnode users``/``tokens``)
==============================  ==============================================================

Each message is one line of the local log (``audit.log_file``, opened append-only, owner-only, fsync'd per
message: it is the record a site's privacy officer reads) and, when ``audit.syslog`` is set, one RFC 5424
message to the collector (:mod:`radnode.security.syslog`). :meth:`AuditTrail.user_action` is the entry for
other parts of the node (the console's retry, re-send and configuration changes) to audit what a person did.

The patient's ParticipantObjectID is a keyed hash of the Patient ID by default (``audit.patient_identity``),
so the log holds no patient identifier; :meth:`AuditTrail.patient_reference` gives the same value for a
search.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from radnode.config import AuditConfig
from radnode.security.privacy import SiteKey, open_owner_only

if TYPE_CHECKING:
    from radnode.destinations import Destination

log = logging.getLogger(__name__)

Code = tuple[str, str, str]
"""A coded value: (code, coding scheme, meaning)."""

APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
BEGIN_TRANSFERRING: Code = ("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
EXPORT: Code = ("110106", "DCM", "Export")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")

APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
LOGIN: Code = ("110122", "DCM", "Login")
LOGOUT: Code = ("110123", "DCM", "Logout")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
UNAUTHORIZED_USER: Code = ("110132", "DCM", "Use of Restricted Function")
SECURITY_CONFIGURATION: Code = ("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION: Code = ("110131", "DCM", "Software Configuration")
NETWORK_CONFIGURATION: Code = ("110128", "DCM", "Network Configuration")
USER_SECURITY_ATTRIBUTES_CHANGED: Code = ("110137", "DCM", "User Security Attributes Changed")
LOCAL_SERVICE_OPERATION: Code = ("110141", "DCM", "Local Service Operation Started")
DRIFT_ALERT: Code = ("RADNODE-DRIFT", "99RADNODE", "Input or output distribution shift")
"""A Security Alert's type (PS3.15 A.5.3.11) for a pipeline's drift alert: none of the DICOM types (configuration,
authentication, service operations) says what this is, so it is a code of radnode's private scheme."""

APPLICATION: Code = ("110150", "DCM", "Application")
APPLICATION_LAUNCHER: Code = ("110151", "DCM", "Application Launcher")
DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
SOURCE: Code = ("110153", "DCM", "Source Role ID")
DESTINATION_MEDIA: Code = ("110154", "DCM", "Destination Media")

STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
NODE_ID: Code = ("110182", "DCM", "Node ID")
URI: Code = ("12", "RFC-3881", "URI")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process, a DICOM node or a person."""

    user_id: str
    requestor: bool
    role: Code | None = None
    ae_titles: tuple[str, ...] = ()
    user_name: str | None = None
    address: str | None = None
    """Network access point: an IP address or a host name."""

    def element(self) -> ET.Element:
        attrs = {"UserID": self.user_id, "UserIsRequestor": "true" if self.requestor else "false"}
        if self.ae_titles:
            attrs["AlternativeUserID"] = "AETITLES=" + ";".join(self.ae_titles)
        if self.user_name:
            attrs["UserName"] = self.user_name
        if self.address:
            attrs["NetworkAccessPointID"] = self.address
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(self.address) else "1"
        el = ET.Element("ActiveParticipant", attrs)
        if self.role:
            el.append(_code("RoleIDCode", self.role))
        return el


@dataclass(frozen=True)
class StudyObject:
    """A study as a ParticipantObject (type 2 system object, role 3 report), with its SOP classes."""

    study_uid: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    """SOP Class UID → number of instances."""
    anonymized: bool | None = None

    def element(self, life_cycle: str | None = None) -> ET.Element:
        attrs = {"ParticipantObjectID": self.study_uid, "ParticipantObjectTypeCode": "2",
                 "ParticipantObjectTypeCodeRole": "3"}
        if life_cycle:
            attrs["ParticipantObjectDataLifeCycle"] = life_cycle
        el = ET.Element("ParticipantObjectIdentification", attrs)
        el.append(_code("ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID))
        ET.SubElement(el, "ParticipantObjectName").text = self.study_uid  # the schema wants a name or a query
        if self.sop_classes or self.anonymized is not None:
            description = ET.SubElement(el, "ParticipantObjectDescription")
            for uid, count in sorted(self.sop_classes.items()):
                ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
            if self.anonymized is not None:
                ET.SubElement(description, "Anonymized").text = "true" if self.anonymized else "false"
        return el


def _patient_element(reference: str) -> ET.Element:
    el = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": reference, "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1"})
    el.append(_code("ParticipantObjectIDTypeCode", PATIENT_NUMBER))
    ET.SubElement(el, "ParticipantObjectName").text = reference  # never the patient's name (PS3.15 makes it optional)
    return el


def _code(tag: str, code: Code) -> ET.Element:
    return ET.Element(tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class AuditTrail:
    """Builds PS3.15 A.5.3 messages and records each one locally and, if configured, at a syslog collector."""

    def __init__(self, config: AuditConfig, data_dir: Path, ae_title: str, site_key: SiteKey,
                 host: str | None = None) -> None:
        self.config = config
        self.ae_title = ae_title
        self.site_key = site_key
        self.host = host or socket.gethostname()
        self.source_id = config.source_id or ae_title
        self.path = config.log_file or data_dir / "audit" / "audit.log"
        self._lock = threading.Lock()
        self._file = open_owner_only(self.path, append=True) if config.enabled else None
        self._syslog = None
        if config.enabled and config.syslog is not None:
            from radnode.security.syslog import SyslogSender

            self._syslog = SyslogSender(config.syslog, hostname=self.host, app_name="radnode")
        self.node = Participant(f"{ae_title}@{self.host}", False, None, (ae_title,), "radnode", None)

    # -- the messages --------------------------------------------------------------------------------------

    def application_activity(self, started: bool) -> str:
        """Application Activity: the node started or stopped (launched by this OS process)."""
        node = Participant(f"{self.ae_title}@{self.host}", False, APPLICATION, (self.ae_title,), "radnode")
        launcher = Participant(f"pid:{os.getpid()}", True, APPLICATION_LAUNCHER, user_name=_os_user())
        return self._emit(APPLICATION_ACTIVITY, "E", SUCCESS, [APPLICATION_START if started else APPLICATION_STOP],
                          [node, launcher], [])

    def instances_transferred(self, *, study: StudyObject, patient_id: str | None, source: Participant,
                              destination: Participant, outcome: str = SUCCESS, description: str | None = None,
                              action: str = "C", extra: Iterable[Participant] = ()) -> str:
        """DICOM Instances Transferred: a study's instances received (action C) or sent (action R)."""
        return self._emit(INSTANCES_TRANSFERRED, action, outcome, [], [source, destination, *extra],
                          [study.element(), *self._patient(patient_id)], description)

    def begin_transferring(self, *, study: StudyObject, patient_id: str | None, source: Participant,
                           destination: Participant) -> str:
        """Begin Transferring DICOM Instances: the node starts sending a study's objects."""
        return self._emit(BEGIN_TRANSFERRING, "E", SUCCESS, [], [source, destination],
                          [study.element(), *self._patient(patient_id)])

    def export(self, *, study: StudyObject, patient_id: str | None, destination: Participant,
               exporter: Participant | None = None, outcome: str = SUCCESS, description: str | None = None) -> str:
        """Export: data leaves the node's security domain (a forward to a research or cloud destination)."""
        exporter = exporter or Participant(self.node.user_id, True, SOURCE, (self.ae_title,), "radnode")
        media = Participant(destination.user_id, False, DESTINATION_MEDIA, destination.ae_titles,
                            address=destination.address)
        remote = Participant(destination.user_id, False, DESTINATION, destination.ae_titles, destination.user_name,
                             destination.address)
        return self._emit(EXPORT, "R", outcome, [], [remote, exporter, media],
                          [study.element("10"), *self._patient(patient_id)], description)

    def instances_processed(self, *, study_uid: str, patient_id: str | None, job: str, pipeline: str,
                            models: Mapping[str, str]) -> str:
        """DICOM Instances Accessed (110103, action Read): a job's process read the study to run ``pipeline``
        with the model folders ``models`` (path → content hash), each a Processing Element participant object,
        so the trail says exactly which code saw the study and produced its results."""
        process = Participant(job, True, APPLICATION, (self.ae_title,), pipeline)
        objects = [StudyObject(study_uid).element(), *self._patient(patient_id)]
        for folder, digest in models.items():
            obj = ET.Element("ParticipantObjectIdentification", {
                "ParticipantObjectID": digest, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "26"})
            obj.append(_code("ParticipantObjectIDTypeCode", URI))
            ET.SubElement(obj, "ParticipantObjectName").text = folder
            objects.append(obj)
        return self._emit(INSTANCES_ACCESSED, "R", SUCCESS, [], [process], objects)

    def query(self, *, requestor: Participant, sop_class: str, query: bytes) -> str:
        """Query: a C-FIND (or QIDO) the node answered; the query data set is recorded as it came."""
        import base64

        responder = Participant(self.node.user_id, False, DESTINATION, (self.ae_title,), address=None)
        obj = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": sop_class, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        obj.append(_code("ParticipantObjectIDTypeCode", ("110181", "DCM", "SOP Class UID")))
        ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
        return self._emit(QUERY, "E", SUCCESS, [], [requestor, responder], [obj])

    def security_alert(self, *, alert: Code, description: str, reporter: Participant | None = None,
                       performer: Participant | None = None, outcome: str = MINOR_FAILURE) -> str:
        """Security Alert: e.g. an association rejected (node authentication) or a TLS handshake refused."""
        reporter = reporter or Participant(self.node.user_id, False, None, (self.ae_title,), "radnode")
        participants = [reporter] + ([performer] if performer else [])
        obj = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": self.node.user_id, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13"})
        obj.append(_code("ParticipantObjectIDTypeCode", NODE_ID))
        ET.SubElement(obj, "ParticipantObjectName").text = self.ae_title
        ET.SubElement(obj, "ParticipantObjectDetail", {"type": "Alert Description",
                                                       "value": _b64(description)})
        return self._emit(SECURITY_ALERT, "E", outcome, [alert], participants, [obj], description)

    def user_authentication(self, *, user: str, address: str | None, success: bool, login: bool = True,
                            description: str | None = None) -> str:
        """User Authentication: a person logged in (or failed to) or out at the console."""
        person = Participant(user, True, None, user_name=user, address=address)
        node = Participant(self.node.user_id, False, None, (self.ae_title,), "radnode")
        return self._emit(USER_AUTHENTICATION, "E", SUCCESS if success else MINOR_FAILURE,
                          [LOGIN if login else LOGOUT], [person, node], [], description)

    def user_action(self, *, user: str, address: str | None, action: str, what: str,
                    study_uid: str | None = None, patient_id: str | None = None, success: bool = True,
                    configuration: bool = False, refused: str | None = None) -> str:
        """An action a person took through the console or API (retry, re-send, cancel, configuration change):
        a Security Alert of type Local Service Operation (or Software Configuration for a config change) with
        the user as the requestor, so the audit trail says who did what to which study. ``refused``: the
        attempt was refused, and why (outcome minor failure, the reason in the description)."""
        person = Participant(user, True, None, user_name=user, address=address)
        node = Participant(self.node.user_id, False, None, (self.ae_title,), "radnode")
        objects = []
        if study_uid:
            objects = [StudyObject(study_uid).element(), *self._patient(patient_id)]
        detail = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": what, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "20"})
        detail.append(_code("ParticipantObjectIDTypeCode", URI))
        ET.SubElement(detail, "ParticipantObjectName").text = action
        alert = SOFTWARE_CONFIGURATION if configuration else LOCAL_SERVICE_OPERATION
        outcome = SUCCESS if success and refused is None else MINOR_FAILURE
        description = f"{user}: {action} {what}" + (f" refused: {refused}" if refused is not None else "")
        return self._emit(SECURITY_ALERT, "E", outcome, [alert], [person, node], [*objects, detail], description)

    def account_changed(self, *, action: str, account: str) -> str:
        """A console account or API token added, removed, or its role or password changed (``radnode users``,
        ``radnode tokens``): a Security Alert of type User Security Attributes Changed with the OS user who ran
        the command as the requestor, so the trail says who gave whom which access. ``account``: ``user/NAME``
        or ``token/NAME``; never a password or token value."""
        operator = _os_user()
        person = Participant(operator, True, None, user_name=operator)
        node = Participant(self.node.user_id, False, None, (self.ae_title,), "radnode")
        detail = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": account, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "20"})
        detail.append(_code("ParticipantObjectIDTypeCode", URI))
        ET.SubElement(detail, "ParticipantObjectName").text = action
        return self._emit(SECURITY_ALERT, "E", SUCCESS, [USER_SECURITY_ATTRIBUTES_CHANGED], [person, node], [detail],
                          f"{operator}: {action} {account}")

    # -- plumbing ------------------------------------------------------------------------------------------

    def patient_reference(self, patient_id: str) -> str:
        """The ParticipantObjectID for a patient: the Patient ID, or its keyed hash (``audit.patient_identity``)."""
        if self.config.patient_identity == "clear":
            return patient_id
        return self.site_key.pseudonym("patient", patient_id)

    def _patient(self, patient_id: str | None) -> list[ET.Element]:
        return [_patient_element(self.patient_reference(patient_id))] if patient_id else []

    def _emit(self, event: Code, action: str, outcome: str, types: list[Code], participants: list[Participant],
              objects: list[ET.Element], description: str | None = None) -> str:
        root = ET.Element("AuditMessage")
        ident = ET.SubElement(root, "EventIdentification", {
            "EventActionCode": action, "EventDateTime": _now(), "EventOutcomeIndicator": outcome})
        ident.append(_code("EventID", event))
        for type_code in types:
            ident.append(_code("EventTypeCode", type_code))
        if description:
            ET.SubElement(ident, "EventOutcomeDescription").text = _one_line(description)
        for participant in participants:
            root.append(participant.element())
        source = ET.SubElement(root, "AuditSourceIdentification", {
            "AuditSourceID": self.source_id, **({"AuditEnterpriseSiteID": self.config.enterprise_site_id}
                                                if self.config.enterprise_site_id else {})})
        ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
        root.extend(objects)
        text = ET.tostring(root, encoding="unicode")
        self.write(text)
        return text

    def write(self, message: str) -> None:
        """Append one message to the local log (fsync'd) and queue it for the collector."""
        if self._file is None:
            return
        with self._lock:
            self._file.write(message.encode() + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._syslog is not None:
            self._syslog.send(message)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what the collector has not yet received (up to ``timeout``) and close the log."""
        if self._syslog is not None:
            self._syslog.close(timeout)
        if self._file is not None:
            with self._lock:
                self._file.close()
                self._file = None

    def messages(self) -> Iterator[str]:
        """Every message in the local log, oldest first."""
        return read_audit_log(self.path)


def read_audit_log(path: Path) -> Iterator[str]:
    """The messages of a local audit log, one per line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _os_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def dicom_node(ae_title: str, address: str | None, requestor: bool, role: Code) -> Participant:
    """A remote DICOM application as an ActiveParticipant (UserID ``AE@address``)."""
    host = (address or "").rsplit(":", 1)[0] if address and address.count(":") == 1 else address
    return Participant(f"{ae_title}@{host}" if host else ae_title, requestor, role, (ae_title,), address=host or None)


def destination_participant(name: str, destination: "Destination") -> Participant:
    """A delivery destination as the ActiveParticipant receiving it: a DICOM node by its AE title and host,
    any other by its configured name and where it sends (never a secret)."""
    ae_title, host = getattr(destination, "ae_title", None), getattr(destination, "host", None)
    if ae_title and host:
        return Participant(f"{ae_title}@{host}", False, DESTINATION, (ae_title,), name, address=host)
    return Participant(destination.describe(), False, DESTINATION, user_name=name)


def audit_send(trail: AuditTrail, *, study_uid: str, patient_id: str | None, name: str, destination: "Destination",
               sop_classes: Mapping[str, int], sent: int, failures: list[str], export: bool) -> str:
    """The message for one send of a job's objects to one destination (one association or request): DICOM
    Instances Transferred (action Read: the node sent them), or an Export when the data leaves the node's
    domain (a forward, or a destination that gets de-identified copies, marked Anonymized), with the SOP
    classes delivered and the outcome: success, minor failure (some objects failed), serious failure (none
    went), the first failure's cause in the description."""
    outcome = SUCCESS if not failures else (MINOR_FAILURE if sent else SERIOUS_FAILURE)
    why = f"{len(failures)} of {sent + len(failures)} objects not delivered: {failures[0]}" if failures else None
    receiver = destination_participant(name, destination)
    study = StudyObject(study_uid, dict(sop_classes), anonymized=True if destination.deidentify else None)
    if export:
        return trail.export(study=study, patient_id=patient_id, destination=receiver, outcome=outcome, description=why)
    sender = Participant(trail.node.user_id, True, SOURCE, (trail.ae_title,), "radnode")
    return trail.instances_transferred(study=study, patient_id=patient_id, source=sender, destination=receiver,
                                       outcome=outcome, description=why, action="R")
