"""The node's web side (issue 15): REST API, operators' dashboard, Prometheus metrics, the Orthanc plugin's
event endpoint and DICOMweb STOW-RS, on FastAPI/Starlette served by uvicorn.

=============== ===========================================================================================
``accounts``    people and API tokens: roles, argon2 password hashes, hashed tokens, login sessions
``auth``        who is asking (Bearer token or session cookie, CSRF on cookie requests) and what they may do
``schemas``     the API's documents (Pydantic): ISO-8601 UTC times, named states and priorities
``api``         ``/health``, the job list and one job under ``/api``, ``/orthanc/events``
``actions``     operators' actions: retry, re-send, cancel, force complete, pause/resume, mark reviewed
``views``       the overview, a job's files, destinations with a live check, rules with a test, the audit log
``dashboard``   the login and the server-rendered pages (templates/, static/), no CDN
``stow``        ``POST /dicom-web/studies``: STOW-RS into the same ingest path as C-STORE
``metrics``     ``/metrics``: counters and gauges read from the job store, so they match it
``app``         the FastAPI application wiring the above
``server``      uvicorn in a thread: address, TLS, bounded connections and idle timeouts
``service``     the console as part of a running node
``client``      the CLI's side: ``radnode jobs …`` talking to a running node with a token
=============== ===========================================================================================

The rows these read and write live in the job store's console area (``radnode.node.store.console``).
"""
