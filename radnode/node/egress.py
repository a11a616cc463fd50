"""Egress: a finished job's results go to the outbox, then to each destination by its own queue and worker.

Every (job, destination, object) is a delivery row naming the destination by its configured name (or, for
return-to-sender and rows a configuration no longer names, by its one-line form). Each destination has one
worker thread that sends its due deliveries, one batch per job, with the destination's own timeouts, so a
hung or slow peer delays nobody else. A delivery recorded as done is never attempted again; one that fails is
retried with exponential back-off until ``egress.max_attempts``; a send ended by the node's own stop counts
as no attempt (it stays pending, due at once after the next start). The job is ``done`` when all its deliveries
are done, ``failed`` (results kept in the outbox) when some gave up; :meth:`Egress.resend` puts delivered or
failed deliveries back in the queue (same outbox files, so the same SOP Instance UIDs). After a restart the
workers pick up whatever is pending.

A destination with ``deidentify: PROFILE`` gets de-identified copies (``outbox/<job>/deid-<profile>/``, made
once per job and profile when the job is staged, :mod:`radnode.security.deid`); what the profile refuses
(burned-in annotation) and files that are not DICOM are not planned for it, and the job's events say why.
Every send (one batch of one job to one destination) is audited (:mod:`radnode.security.audit`): DICOM
Instances Transferred, or Export for a forward or a de-identified destination, with its outcome.

A job whose results supersede an earlier job's (a re-run on the whole study after late instances) also
delivers an IHE IOCM rejection note (a KOS "Rejected for Quality Reasons") to every destination that received
the earlier DICOM results, each naming exactly what that destination received (``Outcome.sent_uid`` per
delivery): ``rejection-note.dcm``, and ``rejection-<n>/rejection-note.dcm`` for destinations that received
other objects (the Encapsulated PDF only some take, say);
the FHIR report is re-issued in place by the run itself (same identifier, status corrected). A reviewer's
decision goes out the same way (:meth:`Egress.decide`, ``radnode/feedback/reissue.py``): a verified report SR
or rejection notes (named and grouped as above, inside ``review-<id>/``), and the FHIR report's new status, as
deliveries of the job's ``review-<id>/`` objects.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from radnode.config import Config
from radnode.destinations import Destination, DestinationError, Item, Outcome, SendContext, parse_destination
from radnode.destinations.base import FHIR_BUNDLE, Cancellation, sop_instance_uid
from radnode.destinations.dicom import DicomDestination
from radnode.destinations.orthanc import OrthancDestination
from radnode.node.store import Delivery, Job, JobStore, ReissuePlan, ResultsOutOfDate, ShadowNotDelivered
from radnode.outputs.layout import RunOutput, dicom_files, is_dicom, review_folder, review_of
from radnode.outputs.rejection import write_rejection_note

if TYPE_CHECKING:
    from radnode.security.audit import AuditTrail
    from radnode.security.deid import Deidentifier

log = logging.getLogger(__name__)

REJECTION_NOTE = RunOutput.REJECTION_NOTE.file
"""The IOCM rejection note a job's outbox holds when its results supersede an earlier job's."""

ORTHANC = "orthanc"
"""The name of the implicit destination for ``orthanc.results_to_orthanc`` (unless a destination has it)."""


DEID_FOLDER = "deid-"
"""Prefix of the outbox folder of a profile's de-identified copies (``deid-<profile>/``)."""


def _delivered_as(delivery_object: str) -> str:
    """Where a destination keeping the job's files together puts a delivery object: at its outbox path, a
    de-identified copy at the original's (``deid-basic/seg.dcm`` → ``seg.dcm``)."""
    folder, _, rest = delivery_object.partition("/")
    return rest if rest and folder.startswith(DEID_FOLDER) else delivery_object


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


def rejection_notes(received: dict[str, list[str]]) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """One IOCM rejection note per distinct set of objects the destinations received, so none is told to reject
    (or learns the UIDs of) what it never had: note file → (the objects it withdraws, the destinations it goes to,
    in name order). ``rejection-note.dcm`` first, then ``rejection-2/rejection-note.dcm``, ``rejection-3/…``,
    relative to the folder the notes are written to (a re-run's outbox, a decision's ``review-<id>/``); a
    destination left nothing to withdraw gets none."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, objects in sorted(received.items()):
        if objects:
            groups.setdefault(tuple(sorted(set(objects))), []).append(name)
    files = itertools.chain([REJECTION_NOTE], (f"rejection-{n}/{REJECTION_NOTE}" for n in itertools.count(2)))
    return dict(zip(files, groups.items()))


class Egress:
    """Plans a job's deliveries and runs one worker per destination that carries them out."""

    def __init__(self, config: Config, store: JobStore, poll_seconds: float = 0.2,
                 audit: "AuditTrail | None" = None) -> None:
        self.config = config
        self.store = store
        self.poll_seconds = poll_seconds
        self.audit = audit
        """Told of every send (DICOM Instances Transferred / Export messages); None: not audited."""
        self._deidentifiers: dict[str, Deidentifier] = {}
        self.destinations: dict[str, Destination] = dict(config.egress.destinations)
        """Configured destinations by name, with the implicit Orthanc one."""
        if config.orthanc.url and config.orthanc.results_to_orthanc:
            self.destinations.setdefault(ORTHANC, OrthancDestination())
        self._unnamed: dict[str, Destination] = {
            str(peer): DicomDestination(ae_title=peer.ae_title, host=peer.host, port=peer.port, tls=peer.tls)
            for peer in config.egress.known_peers if peer.tls is not None}
        """Destinations known by their one-line form only (return-to-sender, rows of an older configuration);
        known peers reached over TLS are there from the start, with their TLS settings."""
        self._workers: dict[str, _Worker] = {}
        self._lingering: dict[str, _Worker] = {}
        """Stopped workers whose send outlived :meth:`stop`'s wait."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # --- planning --------------------------------------------------------------------------------

    def destination(self, name: str) -> Destination:
        """The destination a delivery row names: a configured name, else its one-line form."""
        if name in self.destinations:
            return self.destinations[name]
        with self._lock:
            if name not in self._unnamed:
                try:
                    self._unnamed[name] = parse_destination(name)
                except DestinationError as e:
                    raise DestinationError(f"destination '{name}' is not configured ({e})") from None
            return self._unnamed[name]

    def return_to_sender(self, calling_ae: str) -> list[str]:
        """With return-to-sender, the known peers with the calling AE's title, by their one-line form."""
        if not self.config.egress.return_to_sender:
            return []
        return [str(p) for p in self.config.egress.known_peers if p.ae_title == calling_ae]

    def stage(self, job_id: int, outputs: Path) -> None:
        """Copy a finished run's outputs to the outbox and move the job to ``delivering`` with its deliveries.

        A pipeline's results go to every destination not marked ``forward_only``, back to the sender and to
        the study's route ``forward`` destinations, each taking the files it wants (DICOM objects, the FHIR
        Bundle, ...); a forward-only job (no pipeline) sends the study itself to its forwards only. A shadow
        run's results are refused (ShadowNotDelivered), here and by the store: they never leave the node. Results
        out of date (a later job of the study's pipeline delivered first, ``ResultsOutOfDate``) stay in the
        outbox and the job is done, sent nowhere.
        """
        job = self.store.job(job_id)
        if job is None:
            return
        if job.shadow:
            raise ShadowNotDelivered(f"job {job_id} is a shadow run of job {job.sibling_of}: its results are "
                                     "compared, never delivered")
        try:
            names = _copy_durably(outputs, outbox_dir(self.config, job_id))
            forwards = {name: self.destination(name) for name in job.forwards}
        except (OSError, DestinationError) as e:
            self.store.fail_job(job_id, f"cannot stage the results: {e}")
            return
        try:
            withdraw = self._supersede(job_id, names) if job.pipeline else []
        except ResultsOutOfDate as e:  # done, kept in the outbox, sent nowhere
            self.store.begin_delivery(job_id, f"{len(names)} outputs copied to the outbox; not delivered: {e}", [])
            return
        targets: dict[str, Destination] = {}
        if job.pipeline:
            targets |= {n: d for n, d in self.destinations.items() if not d.forward_only}
            targets |= {n: self.destination(n) for n in self.return_to_sender(job.calling_ae)}
        targets |= forwards
        plan: list[tuple[str, str]] = []
        notes: list[str] = []
        for name, destination in targets.items():
            files = [file for file in names if destination.wants(file) and (job.pipeline or is_dicom(file))
                     and PurePosixPath(file).name != REJECTION_NOTE]
            if destination.deidentify is None:
                plan += [(name, file) for file in files]
                continue
            try:
                copies, refused = self._deidentified(job_id, destination.deidentify, files)
            except OSError as e:
                self.store.fail_job(job_id, f"cannot de-identify the results for {name}: {e}")
                return
            plan += [(name, copies[file]) for file in files if file in copies]
            notes += [f"{file} not sent to {name} ({destination.deidentify} de-identification): {why}"
                      for file, why in refused.items()]
        if not job.pipeline:
            plan, skipped = self._not_forwarded_before(job_id, plan)
            notes += skipped
        plan += withdraw  # last: the new results are there before the old go
        dicom = len(dicom_files(names))
        summary = "; ".join([f"{len(names)} outputs ({dicom} DICOM) copied to the outbox",
                             f"{len(plan)} deliveries planned"
                             + (f" to {', '.join(sorted({n for n, _ in plan}))}" if plan else ""), *notes])
        self.store.begin_delivery(job_id, summary, plan)
        self._wake({name for name, _ in plan})

    def _not_forwarded_before(self, job_id: int,
                              plan: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
        """A forward-only job's plan without the instances an earlier job of the study forwarded to the same
        destination (the study forwarded again after late instances: only what the destination lacks goes),
        and a note per destination saying how many were left out."""
        folder = outbox_dir(self.config, job_id)
        kept: list[tuple[str, str]] = []
        left_out: dict[str, set[int]] = {}
        counts: dict[str, int] = {}
        earlier = {name: self.store.forwarded_earlier(job_id, name) for name in {n for n, _ in plan}}
        for name, item in plan:
            uid = sop_instance_uid(folder / item) if earlier[name] else None
            if uid is not None and uid in earlier[name]:
                left_out.setdefault(name, set()).add(earlier[name][uid])
                counts[name] = counts.get(name, 0) + 1
                continue
            kept.append((name, item))
        notes = [f"{counts[name]} instance(s) not sent to {name} again: forwarded there by job(s) "
                 f"{', '.join(map(str, sorted(jobs)))}" for name, jobs in sorted(left_out.items())]
        return kept, notes

    def _deidentified(self, job_id: int, profile: str, files: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """De-identified copies of outbox files in ``outbox/<job>/deid-<profile>/`` under their own names (made
        once per job and profile, fsync'd): outbox file → its copy's delivery object, and the files refused
        with why (not DICOM, burned-in annotation)."""
        from radnode.security.deid import Refused, deidentify_file

        folder = outbox_dir(self.config, job_id)
        target = folder / f"{DEID_FOLDER}{profile}"
        target.mkdir(exist_ok=True)
        copies, refused = {}, {}
        for file in files:
            copy = target / file
            if not copy.exists():
                try:
                    ds = deidentify_file(folder / file, self._deidentifier(profile))
                except Refused as e:
                    refused[file] = str(e)
                    continue
                except Exception as e:  # a defect de-identifying one object must neither send it nor stop egress
                    log.exception("job %d: %s cannot be de-identified (%s)", job_id, file, profile)
                    refused[file] = f"cannot be de-identified ({type(e).__name__}: {e})"
                    continue
                partial = copy.with_name(copy.name + ".partial")
                ds.save_as(partial, enforce_file_format=True)
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(partial, copy)
            copies[file] = f"{target.name}/{file}"
        return copies, refused

    def _deidentifier(self, profile: str) -> "Deidentifier":
        """The profile's de-identifier with the site key and pseudonym mapping (one per profile)."""
        from radnode.security.deid import deidentifier_for
        from radnode.security.privacy import SiteKey

        if profile not in self._deidentifiers:
            site_key = self.audit.site_key if self.audit is not None else SiteKey.load(
                self.config.privacy.site_key, self.config.data_dir)
            self._deidentifiers[profile] = deidentifier_for(self.config, profile, site_key)
        return self._deidentifiers[profile]

    def _supersede(self, job_id: int, names: list[str]) -> list[tuple[str, str]]:
        """When this job's results supersede an earlier job's (a re-run on the whole study), write the IOCM
        rejection notes of what that job sent into this job's outbox (added to ``names``); returns the
        (destination, note) deliveries: each destination that got (or was being sent) a superseded DICOM object
        gets a note referencing only those objects, never one that went elsewhere only (:func:`rejection_notes`)."""
        superseded = self.store.supersede(job_id, REJECTION_NOTE)
        if superseded is None:
            return []
        self.store.settle_job(superseded.superseded)  # its pending deliveries were stopped
        sent = {name: objects for name, objects in superseded.sent.items() if not self._deidentifying(name)}
        if len(sent) < len(superseded.sent):  # a note naming the patient must not follow de-identified copies
            self.store.note(job_id, "withdraw-error", "not withdrawn at "
                           f"{', '.join(sorted(set(superseded.sent) - set(sent)))} (de-identified copies went there)")
        old = outbox_dir(self.config, superseded.superseded)
        files = sorted({name for objects in sent.values() for name in objects})
        if missing := [name for name in files if not (old / name).is_file()]:
            self.store.note(job_id, "withdraw-error", f"job {superseded.superseded}'s {', '.join(missing)} no longer "
                                                     "in its outbox (purged?): not referenced by the rejection note")
        present = {name: [o for o in objects if o not in missing] for name, objects in sent.items()}
        plan: list[tuple[str, str]] = []
        for note, (withdrawn, destinations) in rejection_notes(present).items():
            target = outbox_dir(self.config, job_id) / note
            try:
                target.parent.mkdir(exist_ok=True)
                uid = write_rejection_note([old / name for name in withdrawn], target, uid_root=self.config.uid_root,
                                           institution_name=self.config.institution_name)
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
            except Exception as e:  # an old object that cannot be read (damaged) must not keep the new results back
                log.exception("job %d: the rejection note of job %d cannot be written", job_id, superseded.superseded)
                target.unlink(missing_ok=True)
                self.store.note(job_id, "withdraw-error", f"job {superseded.superseded}'s results cannot be withdrawn: "
                                                         f"rejection note not written ({type(e).__name__}: {e}); "
                                                         f"not withdrawn at {', '.join(destinations)}")
                continue
            names.append(note)
            plan += [(name, note) for name in destinations]
            self.store.note(job_id, "withdraw",
                           f"rejection note {uid} ({note}, Rejected for Quality Reasons) withdraws job "
                           f"{superseded.superseded}'s {', '.join(withdrawn)} at {', '.join(destinations)}")
        return plan

    def _deidentifying(self, name: str) -> bool:
        """Whether the destination a delivery row names de-identifies (an unknown one counts as doing so)."""
        try:
            return self.destination(name).deidentify is not None
        except DestinationError:
            return True

    def decide(self, job_id: int, reviewer: str, note: str, decision: str, reason: str | None) -> str:
        """Record a reviewer's decision on a job's results and send it where they went, as deliveries of
        ``review-<id>/`` (:mod:`radnode.feedback.reissue`), in one store transaction (``JobStore.decide``): a
        refusal (results a re-run superseded or retention purged, a forward-only job: what it delivered is the
        study, not results) records nothing and leaves no ``review-<id>/`` behind. What was queued, in words ("":
        nothing to re-issue, as the job's log says); LookupError for an unknown job."""
        planned: dict[int, ReissuePlan] = {}

        def plan(review_id: int) -> ReissuePlan:
            planned[review_id] = self._plan_reissue(job_id, review_id, decision, reviewer)
            return planned[review_id]

        try:
            review_id, queued = self.store.decide(job_id, reviewer, note, decision, reason, plan)
        except BaseException:
            for tried in planned:  # rolled back: its id is given again, never to these objects
                shutil.rmtree(outbox_dir(self.config, job_id) / review_folder(tried), ignore_errors=True)
            raise
        if queued is None:
            return f"already re-issued as {decision} by {reviewer}: nothing sent again"
        reissue = planned[review_id]
        if reissue.deliveries is None:
            return f"{reissue.summary}: {reissue.notes[-1]}"
        self._wake({name for name, _ in reissue.deliveries})
        return (f"re-issue queued: {', '.join(sorted({f'{Path(o).name} → {n}' for n, o in reissue.deliveries}))}"
                if reissue.deliveries else "")

    def _plan_reissue(self, job_id: int, review_id: int, decision: str, reviewer: str) -> ReissuePlan:
        """Write a decision's objects into ``review-<id>/`` and plan where they go: accepted or corrected, the
        report SR verified by ``reviewer`` to each DICOM destination that received the report SR; rejected, IOCM
        rejection notes of the DICOM objects the job delivered, each destination's referencing only those it
        received (:func:`rejection_notes`, as for superseded results); either way the FHIR report's new status to
        each FHIR destination that received the Bundle. Destinations that de-identify are left out (a verified
        report or a note naming the patient must not follow de-identified copies). Runs inside the decision's
        transaction: it writes nothing to the store."""
        import datetime

        from radnode.feedback.reissue import REPORT_REISSUE, REPORT_SR, Decision, write_reissue

        summary = f"{decision} by {reviewer} (review {review_id})"
        folder = outbox_dir(self.config, job_id)
        review = review_folder(review_id)
        shutil.rmtree(folder / review, ignore_errors=True)  # a crashed attempt's, of this id
        done = [d for d in self.store.deliveries(job_id) if d.state == "done"]
        skipped = sorted({d.destination for d in done if self._deidentifying(d.destination)})
        notes = [f"not re-issued at {', '.join(skipped)} (de-identified copies went there)"] if skipped else []
        done = [d for d in done if d.destination not in skipped]
        reports = [d for d in done if Path(d.object).name == REPORT_SR and (d.object == REPORT_SR
                                                                             or review_of(d.object) is not None)]
        rejections: dict[str, tuple[tuple[str, ...], list[str]]] = {}
        if decision == "rejected":
            received: dict[str, list[str]] = defaultdict(list)
            for d in done:  # the results and their verified versions, never a rejection note or a de-identified copy
                if (is_dicom(d.object) and Path(d.object).name != REJECTION_NOTE and (folder / d.object).is_file()
                        and (review_of(d.object) is not None or "/" not in d.object)):
                    received[d.destination].append(d.object)
            rejections = rejection_notes(received)
            recipients = {f"{review}/{note}": destinations for note, (_, destinations) in rejections.items()}
        else:
            recipients = {f"{review}/{REPORT_SR}": sorted({d.destination for d in done if d.object == REPORT_SR})}
        fhir = sorted({d.destination for d in done if d.object == FHIR_BUNDLE})
        versions = sorted((review_of(d.object) or 0, d.object) for d in reports)
        previous = folder / versions[-1][1] if versions else None
        config = self.config
        try:
            objects = write_reissue(
                folder, Decision(review_id, decision, reviewer, datetime.datetime.now().astimezone()),
                previous_report=previous if previous is not None and previous.is_file() else None,
                instance_number=1 + len({o for _, o in versions}), fhir=bool(fhir),
                withdrawn={note: [folder / o for o in names] for note, (names, _) in rejections.items()},
                organization=config.feedback.verifying_organization or config.institution_name
                or config.ingress.ae_title, uid_root=config.uid_root, institution_name=config.institution_name)
        except Exception as e:  # a defect writing one decision's objects must not lose the decision or stop egress
            log.exception("job %d: review %d cannot be re-issued", job_id, review_id)
            return ReissuePlan(summary, None, [*notes, f"cannot be re-issued ({type(e).__name__}: {e}); "
                                                       "repeat the decision"])
        plan = [(name, o) for o in objects for name in recipients.get(o, [])]
        plan += [(name, o) for o in objects if Path(o).name == REPORT_REISSUE for name in fhir]
        return ReissuePlan(summary, plan, notes)

    def resend(self, job_id: int, destination: str | None = None, *, user: str, reason: str,
               failed_only: bool = False) -> int:
        """Deliver a job's results again, to every destination or one (even after they gave up): its delivered
        and failed deliveries (``failed_only``: only those that gave up) go back to the queue and their workers
        are woken; returns how many. The one re-send path: the console's action and ``radnode jobs resend`` call
        it. LookupError for an unknown job; ActionRefused (a ValueError) saying why not."""
        count = self.store.resend(job_id, destination, user=user, reason=reason, failed_only=failed_only)
        self._wake({d.destination for d in self.store.deliveries(job_id) if d.state == "pending"})
        return count

    # --- delivering ------------------------------------------------------------------------------

    def deliver_due(self) -> None:
        """One pass over every destination's due deliveries, in this thread (the workers do the same, each
        for its own destination)."""
        for name in self.store.pending_destinations():
            self.deliver_due_to(name)

    def deliver_due_to(self, name: str, cancellation: Cancellation | None = None) -> None:
        """Send one destination's due deliveries, one batch per job, and settle those jobs."""
        due = self.store.due_deliveries_to(name)
        if not due:
            return
        by_job: dict[int, list[Delivery]] = defaultdict(list)
        for delivery in due:
            by_job[delivery.job_id].append(delivery)
        try:
            destination = self.destination(name)
        except DestinationError as e:
            for delivery in due:
                self._failed(delivery, str(e))
            destination = None
        for job_id, deliveries in by_job.items():
            stopped = self._stopping.is_set() or (cancellation is not None and cancellation.cancelled)
            if destination is not None and not stopped:
                self._send(destination, job_id, deliveries, cancellation or Cancellation())
            state = self.store.settle_job(job_id)
            if state is not None:
                log.debug("job %d %s", job_id, state)

    def _send(self, destination: Destination, job_id: int, deliveries: list[Delivery],
              cancellation: Cancellation) -> None:
        folder = outbox_dir(self.config, job_id)
        items = {d.id: Item(d.id, folder / d.object, _delivered_as(d.object)) for d in deliveries}
        by_id = {d.id: d for d in deliveries}
        recorded: set[int] = set()

        def record(outcome: Outcome) -> None:
            """Record one outcome now (a C-STORE answered is in the store before the next is sent)."""
            if outcome.item.delivery_id in recorded or outcome.item.delivery_id not in by_id:
                return
            recorded.add(outcome.item.delivery_id)
            if outcome.ok:
                self.store.delivery_done(outcome.item.delivery_id, outcome.message, sent_uid=outcome.sent_uid)
            elif cancellation.cancelled:  # ended by the node's own stop: no attempt, sent at once after the next start
                log.info("job %d: %s → %s stopped with egress (%s); still pending", job_id,
                         by_id[outcome.item.delivery_id].object, destination.describe(), outcome.message)
            else:
                self._failed(by_id[outcome.item.delivery_id], outcome.message)

        context = SendContext(ae_title=self.config.ingress.ae_title,
                              timeouts=destination.timeouts.over(self.config.egress.timeouts),
                              orthanc=self.config.orthanc, job_id=job_id, cancellation=cancellation, on_outcome=record)
        try:
            outcomes = destination.send(list(items.values()), context)
        except Exception as e:  # a destination type's defect must not stop its queue or lose the record
            log.exception("sending job %d to %s failed", job_id, destination.describe())
            outcomes = [Outcome(item, False, f"{type(e).__name__}: {e}") for item in items.values()]
        answered = {outcome.item.delivery_id for outcome in outcomes}
        outcomes += [Outcome(item, False, f"{destination.describe()} gave no answer for {item.name}")
                     for item in items.values() if item.delivery_id not in answered]
        for outcome in outcomes:
            record(outcome)
        if self.audit is not None:
            self._audit(destination, deliveries[0].destination, job_id, outcomes)

    def _audit(self, destination: Destination, name: str, job_id: int, outcomes: list[Outcome]) -> None:
        """The audit trail's record of one send (see :func:`radnode.security.audit.audit_send`)."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        from radnode.security.audit import audit_send

        job: Job | None = self.store.job(job_id)
        if job is None or self.audit is None:
            return
        sop_classes: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.ok and is_dicom(outcome.item.name):
                try:
                    uid = str(pydicom.dcmread(outcome.item.path, stop_before_pixels=True,
                                              specific_tags=["SOPClassUID"]).SOPClassUID)
                except (OSError, InvalidDicomError, AttributeError):
                    continue
                sop_classes[uid] = sop_classes.get(uid, 0) + 1
        failures = [o.message for o in outcomes if not o.ok]
        audit_send(self.audit, study_uid=job.study_instance_uid, patient_id=job.patient_id or None, name=name,
                   destination=destination, sop_classes=sop_classes, sent=len(outcomes) - len(failures),
                   failures=failures, export=name in job.forwards or destination.deidentify is not None)

    def _failed(self, delivery: Delivery, error: str) -> None:
        egress = self.config.egress
        self.store.delivery_failed(delivery.id, error, egress.max_attempts,
                                   (egress.retry_initial_seconds, egress.retry_max_seconds))

    # --- workers ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start a worker per configured destination, and one per destination that has pending deliveries
        (return-to-sender peers, rows of an earlier configuration); :meth:`dispatch` adds those found later."""
        self._stopping.clear()
        for name in self.destinations:
            self._worker(name)
        self.dispatch()

    def dispatch(self) -> None:
        """Make sure every destination with pending deliveries has its worker (the node calls this regularly)."""
        if self._stopping.is_set():
            return
        for name in self.store.pending_destinations():
            self._worker(name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers: sends in progress are cancelled where the type can, the rest end at their timeout
        (their deliveries stay pending, no attempt counted, and are sent after the next start)."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.thread.join(timeout)
            if worker.thread.is_alive():
                log.warning("egress to %s still busy after %g s; its delivery stays pending", worker.name, timeout)
                with self._lock:
                    self._lingering[worker.name] = worker
        for deidentifier in self._deidentifiers.values():
            if deidentifier.mapping is not None:
                deidentifier.mapping.close()
        self._deidentifiers.clear()

    def _worker(self, name: str) -> None:
        """The destination's worker, unless it has one, egress is stopping, or a stopped one is still ending its
        send (one worker per destination: :meth:`dispatch` starts it once that one is gone)."""
        with self._lock:
            if name in self._workers or self._stopping.is_set():
                return
            lingering = self._lingering.get(name)
            if lingering is not None and lingering.thread.is_alive():
                return
            self._lingering.pop(name, None)
            self._workers[name] = _Worker(name, self)

    def _wake(self, names: set[str]) -> None:
        with self._lock:
            workers = [self._workers.get(name) for name in names]
        for worker in workers:
            if worker is not None:
                worker.wake.set()


class _Worker:
    """One destination's queue runner: sends its due deliveries, then sleeps until woken or the next poll."""

    def __init__(self, name: str, egress: Egress) -> None:
        self.name = name
        self.egress = egress
        self.wake = threading.Event()
        self.cancellation = Cancellation()
        self.stopping = threading.Event()
        """This worker's own: egress started again must not revive a stopped worker still ending its send."""
        self.thread = threading.Thread(target=self._run, name=f"radnode-egress-{name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Ask it to end: its send in progress is cancelled where the type can, nothing more is sent."""
        self.stopping.set()
        self.wake.set()
        self.cancellation.cancel()

    def _run(self) -> None:
        stopping = self.stopping
        while not stopping.is_set():
            self.wake.clear()
            try:
                self.egress.deliver_due_to(self.name, self.cancellation)
            except Exception:
                if stopping.is_set():
                    return
                log.exception("egress to %s failed; carrying on", self.name)
            self.wake.wait(self.egress.poll_seconds)

