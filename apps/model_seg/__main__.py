"""MAP entry point: ``python -m radnode.apps.model_seg --input DIR --output DIR [--model DIR ...]`` (or the
HOLOSCAN_* variables; the model folder from HOLOSCAN_MODEL_PATH, in a MAP ``/opt/holoscan/models``)."""

from radnode.execution import app_main

if __name__ == "__main__":
    raise SystemExit(app_main("model_seg"))
