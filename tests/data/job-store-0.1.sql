-- The job store schema of radnode 0.1 (before schema revisions), as its last version created it:
-- the old-release fixture of tests/factories.py (open_store_made_by). Frozen; never edit. (0.1 also added
-- three partial indexes when it opened a store: RELEASE_0_1_INDEXES there.)
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    pipeline TEXT NOT NULL,
    state TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    peer_address TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    priority INTEGER NOT NULL DEFAULT 1,
    forwards TEXT NOT NULL DEFAULT '',
    whole_study INTEGER NOT NULL DEFAULT 0,
    restart_requested INTEGER NOT NULL DEFAULT 0,
    execution_mode TEXT NOT NULL DEFAULT '',
    timeout_seconds REAL,
    needs_review INTEGER,
    review_reasons TEXT NOT NULL DEFAULT '',
    sibling_of INTEGER REFERENCES jobs (id),
    purge_started_at REAL,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    modality TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer_address TEXT NOT NULL,
    association_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    path TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    late INTEGER NOT NULL DEFAULT 0,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS instances_job ON instances (job_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    object TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    done_at REAL,
    UNIQUE (job_id, destination, object)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    pipelines TEXT NOT NULL,
    forwards TEXT NOT NULL,
    discard INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    study_idle_seconds REAL,
    series_grace_seconds REAL,
    late_instances TEXT NOT NULL,
    description TEXT NOT NULL,
    execution_mode TEXT NOT NULL DEFAULT '',
    timeout_seconds REAL,
    expected INTEGER,
    last_association_id TEXT NOT NULL DEFAULT '',
    released_at REAL,
    stable_at REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_instance_uid);
CREATE INDEX IF NOT EXISTS series_association ON series (last_association_id);

