"""The node's web side (issue 15): REST API, operators' dashboard, Prometheus metrics, the Orthanc plugin's
event endpoint and DICOMweb STOW-RS, on FastAPI/Starlette served by uvicorn.

=============== ===========================================================================================
``accounts``    people and API tokens: roles, argon2 password hashes, hashed tokens, login sessions
``auth``        who is asking (Bearer token or session cookie, CSRF on cookie requests) and what they may do
``schemas``     the API's documents (Pydantic): ISO-8601 UTC times, named states and priorities
``api``         the REST endpoints under ``/api``, ``/health``, ``/orthanc/events``
``stow``        ``POST /dicom-web/studies``: STOW-RS into the same ingest path as C-STORE
``metrics``     ``/metrics``: counters and gauges read from the job store, so they match it
``app``         the FastAPI application wiring the above
``server``      uvicorn in a thread: address, TLS, bounded connections and idle timeouts
``client``      the CLI's side: ``radnode jobs …`` talking to a running node with a token
=============== ===========================================================================================
"""
