"""Reusable Holoscan operators for radnode's MONAI Deploy applications (installed as radnode.operators).

Each operator declares its ports in ``setup()`` and does one thing in ``compute()``; the imaging and
output logic they call lives in ``radnode.imaging`` and ``radnode.outputs`` so it is testable on its own.

They import the Holoscan classes that ``monai.deploy.core`` re-exports straight from ``holoscan.core``:
importing ``monai.deploy.core`` imports all of MONAI (torch, transformers), about 8 s per job process on
2 cores, which only the learned-model operators need.
"""
