"""MAP entry point: ``python -m radnode.apps.mri_brain --input DIR --output DIR`` (or HOLOSCAN_* variables)."""

from radnode.execution import app_main

if __name__ == "__main__":
    raise SystemExit(app_main("mri_brain"))
