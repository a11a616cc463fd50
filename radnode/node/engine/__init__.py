"""The distributed engine (``engine.kind: celery``): GPU workers on other hosts fed through RabbitMQ, the
job store in PostgreSQL, study data in shared storage.

=============== =========================================================================================
``broker``      Celery on RabbitMQ: late acks, redelivery of a lost worker's job, priorities, dead letters
``dispatch``    the leader: queued jobs → storage + outbox → broker; reported outputs → egress; the reaper
``gpu_worker``  ``radnode worker``: claims, runs (own process, hard timeout), leases, reports
``storage``     shared folder or S3: inputs once per dispatch, outputs whole or not at all
``leader``      one scheduler/egress leader among the ingress nodes sharing a store
``devices``     GPUs of a host; the workers as ``radnode workers`` lists them
=============== =========================================================================================

The guarantees (README, "Distributed engine") come from three records in the store (``store/cluster.py``):
the outbox (a job is published after the transaction that dispatches it), the attempt number (a fencing
token: a worker that lost its job cannot report over the next attempt) and the lease (renewed by the
worker; the reaper requeues a job whose lease lapsed).
"""
