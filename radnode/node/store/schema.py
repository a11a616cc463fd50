"""The job store's tables (SQLAlchemy Core), one section per area, at the newest schema revision.

The same tables serve SQLite (the embedded default) and PostgreSQL; Alembic revisions in ``migrations/``
bring an older database here (see ``database.py``). A new table is one more section here and one revision
file; the other areas' tables do not change.

Times are seconds since the epoch (``time.time()``, double precision); names that travel together
(``jobs.forwards``) are comma-separated; a series' routing decision is kept whole, as JSON by field name.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON, Boolean, Column, Double, ForeignKey, Index, Integer, MetaData, Table, Text, UniqueConstraint, false, text,
)

NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}
metadata = MetaData(naming_convention=NAMING)

# --- ingest: what arrived ----------------------------------------------------------------------------

studies = Table(
    "studies", metadata,
    Column("study_instance_uid", Text, primary_key=True),
    Column("first_received_at", Double, nullable=False),
    Column("expected_instances", Integer),
    # The sender's Number of Study Related Instances, when an instance carried it.
)
"""One row per study ever received: the row arrivals and queueing of a study lock (``SELECT … FOR UPDATE``),
so two ingress processes recording the same study create one job."""

series = Table(
    "series", metadata,
    Column("series_instance_uid", Text, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("decision", JSON, nullable=False),
    # The routing decision taken on the series' first instance (``SeriesDecision.to_record``).
    Column("skipped", Boolean, nullable=False),
    # The decision does nothing (discarded, the node's own result, no pipeline and no forward): its instances
    # are no job's input.
    Column("expected", Integer),
    Column("last_association_id", Text, nullable=False, server_default=""),
    Column("released_at", Double),
    Column("stable_at", Double),
    Index("series_study", "study_instance_uid"),
    Index("series_association", "last_association_id"),
)

instances = Table(
    "instances", metadata,
    Column("sop_instance_uid", Text, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("series_instance_uid", Text, nullable=False),
    Column("sealed_patient_id", Text, nullable=False),
    # The Patient ID sealed under the site key (``identity.py``; older rows in clear until the node seals them).
    Column("modality", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("peer_address", Text, nullable=False),
    Column("association_id", Text, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("path", Text, nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("late", Boolean, nullable=False, server_default=false()),
    Column("provenance", Text, nullable=False, server_default="external"),
    # ``external``, or ``own-result``: a result of the node's own come back (``routing.Provenance``).
    Column("purged_at", Double),
    # Retention removed the file (the row stays, so a re-sent copy is recognised and indexed anew).
    Index("instances_job", "job_id"),
    Index("instances_kept", "job_id", sqlite_where=text("purged_at IS NULL"),
          postgresql_where=text("purged_at IS NULL")),
)

refusals = Table(
    "refusals", metadata,
    Column("study_instance_uid", Text, primary_key=True),
    Column("sop_instance_uid", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("calling_ae", Text, nullable=False, server_default=""),
    Column("at", Double, nullable=False),
)
"""Instances of a study the node refused (an implausible header, a SOP Instance UID of another study): the
study is incomplete while a row is here, so its job is not processed but fails naming the refusal. The row
goes when the same SOP instance is later received and kept (the sender fixed and re-sent it)."""

# --- jobs: scheduling and the event log --------------------------------------------------------------

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("sealed_patient_id", Text, nullable=False, server_default=""),
    Column("pipeline", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("calling_ae", Text, nullable=False, server_default=""),
    Column("peer_address", Text, nullable=False, server_default=""),
    Column("created_at", Double, nullable=False),
    Column("last_instance_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("runs", Integer, nullable=False, server_default=text("0")),
    Column("reason", Text),
    Column("priority", Integer, nullable=False, server_default=text("1")),
    # ``Priority.rank``: the queue orders by it.
    Column("forwards", Text, nullable=False, server_default=""),
    Column("whole_study", Boolean, nullable=False, server_default=false()),
    Column("restart_requested", Boolean, nullable=False, server_default=false()),
    Column("execution_mode", Text, nullable=False, server_default=""),
    Column("timeout_seconds", Double),
    Column("needs_review", Boolean),
    Column("review_reasons", Text, nullable=False, server_default=""),
    Column("sibling_of", Integer, ForeignKey("jobs.id")),
    Column("purge_started_at", Double),
    Column("purged_at", Double),
    Column("queue", Text, nullable=False, server_default=""),
    # The broker queue the rules name ('' for ``engine.default_queue``); the distributed engine only.
    Column("dispatch_id", Integer),
    # The job's current publication (``publications.id``): a broker message naming another one is stale.
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    # The current attempt's number (``attempts.number``): a worker reporting an older one is fenced off.
    Column("worker", Text, nullable=False, server_default=""),
    Column("lease_until", Double),
    # A running job's lease, renewed by its worker; the reaper requeues the job once it lapsed.
    Column("outcome", Text),
    # ``ok`` once the current attempt's outputs are in the shared storage (the leader then stages them).
    Column("shadow", Boolean, nullable=False, server_default=false()),
    # A shadow run (``sibling_of`` is the production job): results stored and compared, never delivered.
    Index("jobs_study", "study_instance_uid"),
    Index("jobs_state", "state"),
    Index("jobs_purging", "purge_started_at", sqlite_where=text("purge_started_at IS NOT NULL"),
          postgresql_where=text("purge_started_at IS NOT NULL")),
    Index("jobs_siblings", "sibling_of", sqlite_where=text("sibling_of IS NOT NULL"),
          postgresql_where=text("sibling_of IS NOT NULL")),
    sqlite_autoincrement=True,
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("at", Double, nullable=False),
    Column("kind", Text, nullable=False),
    Column("message", Text, nullable=False),
    Index("events_job", "job_id"),
    sqlite_autoincrement=True,
)

# --- deliveries: egress ------------------------------------------------------------------------------

deliveries = Table(
    "deliveries", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("destination", Text, nullable=False),
    Column("object", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Double, nullable=False),
    Column("last_error", Text),
    Column("done_at", Double),
    Column("sent_uid", Text),
    UniqueConstraint("job_id", "destination", "object"),
    Index("deliveries_due", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)

# --- results: versions per study ----------------------------------------------------------------------

result_versions = Table(
    "result_versions", metadata,
    Column("job_id", Integer, ForeignKey("jobs.id"), primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("pipeline", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("superseded_by", Integer, ForeignKey("jobs.id")),
    # The job whose results replace this job's (a re-run on the whole study after late instances).
    Column("superseded_at", Double),
    UniqueConstraint("study_instance_uid", "pipeline", "version"),
)
"""One row per job that staged results: the study's result versions per pipeline (1, 2, …). A newer version
supersedes the one before: its DICOM objects are withdrawn by an IOCM rejection note at every destination
that received them, its FHIR report is updated in place."""
# --- the distributed engine: publications (outbox), attempts, workers ----------------------------------

publications = Table(
    "publications", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("queue", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("published_at", Double),
    Column("tries", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Index("publications_unpublished", "published_at", sqlite_where=text("published_at IS NULL"),
          postgresql_where=text("published_at IS NULL")),
    sqlite_autoincrement=True,
)
"""The outbox of broker messages: written in the transaction that dispatches a job, published (and marked)
afterwards, so a broker that is down delays jobs and loses none."""

attempts = Table(
    "attempts", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("worker", Text, nullable=False),
    Column("started_at", Double, nullable=False),
    Column("ended_at", Double),
    Column("outcome", Text, nullable=False, server_default="running"),
    # running, completed, failed or lost
    Column("reason", Text, nullable=False, server_default=""),
    UniqueConstraint("job_id", "number"),
    sqlite_autoincrement=True,
)
"""One row per run of a job on a worker: who ran it and how it ended."""

workers = Table(
    "workers", metadata,
    Column("name", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("queues", Text, nullable=False),
    Column("gpus", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Double, nullable=False),
    Column("heartbeat_at", Double, nullable=False),
    Column("current_job", Integer),
    Column("stopped_at", Double),
)
"""The ``radnode worker`` processes that ever ran, with their last heartbeat."""

# --- retention: purge_started_at / purged_at on jobs and instances (above) ----------------------------

# --- console: the people and tokens of the web console, operators' actions, what the job list shows ------

users = Table(
    "users", metadata,
    Column("name", Text, primary_key=True),
    Column("role", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    # Argon2id, PHC string format (argon2-cffi)
    Column("created_at", Double, nullable=False),
    Column("last_login_at", Double),
)

api_tokens = Table(
    "api_tokens", metadata,
    Column("name", Text, primary_key=True),
    Column("role", Text, nullable=False),
    Column("token_sha256", Text, nullable=False, unique=True),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double),
    Column("last_used_at", Double),
)

sessions = Table(
    "sessions", metadata,
    Column("id_sha256", Text, primary_key=True),
    Column("user_name", Text, ForeignKey("users.name", ondelete="CASCADE"), nullable=False),
    Column("csrf", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
)

node_settings = Table(
    "node_settings", metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("changed_at", Double, nullable=False),
    Column("changed_by", Text, nullable=False),
)
"""Settings an operator changes at run time, shared by every process on the store (``queue_paused``)."""

reviews = Table(
    "reviews", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("decision", Text, nullable=False),
    # ``reviewed`` (a person looked at a flagged result); the feedback loop adds accepted/rejected/corrected
    Column("reviewer", Text, nullable=False),
    Column("note", Text, nullable=False, server_default=""),
    Column("at", Double, nullable=False),
    Index("reviews_job", "job_id"),
    sqlite_autoincrement=True,
)

study_details = Table(
    "study_details", metadata,
    Column("study_instance_uid", Text, primary_key=True),
    Column("sealed_accession_number", Text, nullable=False, server_default=""),
    Column("study_description", Text, nullable=False, server_default=""),
)
"""What the job list shows of a study beyond its UID, from the study's first instance."""

# --- feedback: clinicians' corrections of the node's segmentations --------------------------------------

corrections = Table(
    "corrections", metadata,
    Column("sop_instance_uid", Text, primary_key=True),
    # The correcting SEG as it arrived (its file: ``instances.path``; no foreign key, so the agreement stays
    # when retention's re-received copy replaces the instance's row).
    Column("study_instance_uid", Text, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    # ``pending`` (not yet matched), ``matched`` (agreement recorded), ``unmatched`` (no job's result fits;
    # kept and listed), ``unreadable`` (the object cannot be read as a SEG on its source's grid)
    Column("job_id", Integer, ForeignKey("jobs.id")),
    # The job whose SEG it corrects (matched only).
    Column("result_sop_instance_uid", Text),
    # The node's own SEG it was compared with.
    Column("model_version", Text, nullable=False, server_default=""),
    # That SEG's algorithm: Manufacturer's Model Name and Software Versions (e.g. ``ct_tissue 0.1.0``).
    Column("agreement", JSON),
    # Per segment: property type, Dice, volumes and their difference (mL, %), HD95 in mm
    # (``radnode.feedback.agreement.SegmentAgreement.to_record``).
    Column("message", Text, nullable=False, server_default=""),
    Column("settled_at", Double),
    Index("corrections_job", "job_id"),
    Index("corrections_state", "state"),
)
"""One row per correction candidate (``Provenance.CORRECTION``): recorded at arrival in the instance's own
transaction, settled by the feedback thread (``radnode/feedback/corrections.py``)."""

# --- drift: each pipeline's inputs and outputs against its baseline ------------------------------------

drift_observations = Table(
    "drift_observations", metadata,
    Column("job_id", Integer, ForeignKey("jobs.id"), primary_key=True),
    Column("pipeline", Text, nullable=False),
    Column("recorded_at", Double, nullable=False),
    Column("inputs", JSON, nullable=False),
    # Attribute → number or category (``radnode.feedback.drift.input_attributes``); no patient identifier.
    Column("outputs", JSON, nullable=False),
    # Each measurement and uncertainty score of the run's report, and its review flag.
    Index("drift_observations_pipeline", "pipeline", "job_id"),
)
"""One row per study a pipeline processed (its done job), recorded when the run ends well."""

drift_states = Table(
    "drift_states", metadata,
    Column("pipeline", Text, primary_key=True),
    Column("attribute", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("psi", Double, nullable=False),
    Column("p_value", Double, nullable=False),
    Column("drifting", Boolean, nullable=False),
    Column("baseline_n", Integer, nullable=False),
    Column("window_n", Integer, nullable=False),
    Column("baseline", Text, nullable=False),
    Column("window", Text, nullable=False),
    Column("evaluated_at", Double, nullable=False),
)
"""Each (pipeline, attribute)'s latest comparison of the window with the baseline (``/metrics``' gauge)."""

drift_alerts = Table(
    "drift_alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", Text, nullable=False),
    Column("attribute", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("psi", Double, nullable=False),
    # At the alert; ``peak_psi`` the largest while it lasted.
    Column("peak_psi", Double, nullable=False),
    Column("p_value", Double, nullable=False),
    Column("message", Text, nullable=False),
    Column("raised_at", Double, nullable=False),
    Column("cleared_at", Double),
    # Null while the shift lasts: one alert per (pipeline, attribute) episode.
    Index("drift_alerts_open", "pipeline", "attribute", "cleared_at"),
    sqlite_autoincrement=True,
)
"""One row per drift episode of a (pipeline, attribute): raised when its shift passes the threshold, cleared when
it is back under it."""
# --- shadow runs: a candidate pipeline beside the production one ---------------------------------------

shadow_comparisons = Table(
    "shadow_comparisons", metadata,
    Column("shadow_job_id", Integer, ForeignKey("jobs.id"), primary_key=True),
    Column("production_job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("production_pipeline", Text, nullable=False),
    Column("candidate_pipeline", Text, nullable=False),
    Column("state", Text, nullable=False),
    # compared, or not-compared (a run failed, no SEG on either side: ``message`` says why)
    Column("message", Text, nullable=False, server_default=""),
    Column("segments", JSON),
    # per common segment (matched by coded property type): Dice, volumes, HD95 (``ShadowSegment``)
    Column("measurements", JSON),
    # each measurement both runs report: both values and their difference
    Column("production_wall_seconds", Double),
    Column("production_cpu_seconds", Double),
    Column("candidate_wall_seconds", Double),
    Column("candidate_cpu_seconds", Double),
    Column("compared_at", Double, nullable=False),
    Index("shadow_comparisons_pipelines", "production_pipeline", "candidate_pipeline"),
    Index("shadow_comparisons_production", "production_job_id"),
)
"""One row per shadow job once it and its production job are final: how the candidate's results compare with
the production run's on the same input (``radnode/feedback/shadow.py``)."""
