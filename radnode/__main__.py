"""``python -m radnode`` is the ``radnode`` command (used for per-job subprocesses)."""

from radnode.cli import main

raise SystemExit(main())
