"""Reusable Holoscan operators for radnode's MONAI Deploy applications (installed as radnode.operators).

Each operator declares its ports in ``setup()`` and does one thing in ``compute()``; the imaging and
output logic they call lives in ``radnode.imaging`` and ``radnode.outputs`` so it is testable on its own.

All of them import the Holoscan classes that ``monai.deploy.core`` re-exports straight from
``holoscan.core``: importing ``monai.deploy.core`` imports all of MONAI (torch, transformers), about 8 s per
job process on 2 cores, and Triton's client (gevent, gRPC) for its remote models, none of which an
operator here uses; a MAP image then carries only what its app imports (``apps/<app>/requirements.txt``).
"""
