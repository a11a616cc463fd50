"""Utilities the tests share that are neither fixtures (``conftest.py``) nor data builders (``factories.py``).

Test modules import from here, never from one another.
"""
