"""Reusable Holoscan operators for radnode's MONAI Deploy applications (installed as radnode.operators).

Each operator declares its ports in ``setup()`` and does one thing in ``compute()``; the imaging and
output logic they call lives in ``radnode.imaging`` and ``radnode.outputs`` so it is testable on its own.
"""
