"""Celery on RabbitMQ as radnode configures it: queues, priorities, dead-lettering, late acknowledgement.

Every setting here serves one of the engine's guarantees:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job's message is acknowledged only after its worker
  reported; a worker that dies (or loses its connection) leaves it unacknowledged, and RabbitMQ hands it to
  another worker at once (a dead TCP peer: when the kernel notices; a silent one: after two missed AMQP
  heartbeats, ``engine.broker_heartbeat_seconds``).
- ``worker_prefetch_multiplier = 1`` with concurrency 1: a worker holds only the message it runs, so the
  queue's priorities decide what the next free worker takes.
- classic durable queues with ``x-max-priority`` (RabbitMQ 3.10's quorum queues have no priorities) and a
  dead-letter queue: a message rejected for good (a job that lost ``engine.max_attempts`` workers) is kept
  there for an operator, never redelivered in a loop.
- persistent messages and publisher confirms: a message the broker confirmed survives its restart.

RabbitMQ's ``consumer_timeout`` (30 min by default) closes the channel of a consumer that holds a message
longer; set it above the longest job (``processing.job_timeout_seconds``) in ``rabbitmq.conf``, as the
deployment recipes do.
"""

from __future__ import annotations

from kombu import Connection, Exchange, Queue

from radnode.config import EngineConfig

TASK = "radnode.run_job"
"""The one task: run job ``job_id`` under dispatch ``dispatch_id`` (the job store has everything else)."""
EXCHANGE = Exchange("radnode.jobs", type="direct", durable=True)
DEAD_LETTER_QUEUE = "radnode.dead-letter"
MAX_PRIORITY = 9
BROKER_PRIORITY = {0: 1, 1: 5, 2: MAX_PRIORITY}
"""``Priority.rank`` (off-peak, routine, stat) → AMQP priority (higher runs first)."""


class BrokerError(RuntimeError):
    """The broker cannot be used; ``str()`` is one line naming it (its password hidden) and why."""


def job_queue(name: str) -> Queue:
    """A job queue as both sides declare it (the same arguments, or RabbitMQ refuses the second)."""
    return Queue(name, EXCHANGE, routing_key=name, durable=True,
                 queue_arguments={"x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange": "",
                                  "x-dead-letter-routing-key": DEAD_LETTER_QUEUE})


def dead_letter_queue() -> Queue:
    """Where rejected messages end (through the default exchange, by name)."""
    return Queue(DEAD_LETTER_QUEUE, Exchange(""), routing_key=DEAD_LETTER_QUEUE, durable=True)


def redacted(url: str) -> str:
    """The broker URL without its password, for messages."""
    return Connection(url).as_uri()


def celery_app(engine: EngineConfig, queues: list[str]):  # -> celery.Celery
    """The Celery application of the node (publishing) or of a worker (consuming ``queues``)."""
    from celery import Celery

    app = Celery("radnode", broker=engine.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_queues=[job_queue(q) for q in queues], task_default_queue=engine.default_queue,
        task_create_missing_queues=False, task_ignore_result=True, task_default_priority=BROKER_PRIORITY[1],
        task_queue_max_priority=MAX_PRIORITY, task_serializer="json", accept_content=["json"],
        broker_heartbeat=engine.broker_heartbeat_seconds, broker_connection_timeout=5,
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        broker_transport_options={"confirm_publish": True}, broker_pool_limit=2,
        worker_hijack_root_logger=False, worker_send_task_events=False, worker_enable_remote_control=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def check_broker(engine: EngineConfig, queues: list[str]) -> None:
    """Connect and declare the queues (and the dead-letter queue); BrokerError with one line when the broker is
    unreachable or refuses them."""
    assert engine.broker_url is not None
    try:
        with Connection(engine.broker_url, connect_timeout=5, heartbeat=0) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            channel = conn.default_channel
            dead_letter_queue()(channel).declare()
            for name in queues:
                job_queue(name)(channel).declare()
    except Exception as e:  # kombu raises the transport's own errors (socket, AMQP, authentication)
        raise BrokerError(f"broker {redacted(engine.broker_url)} unreachable: {' '.join(str(e).split()) or type(e).__name__}") from None
