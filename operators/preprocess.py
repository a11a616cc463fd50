"""Operator preparing a volume for a model: intensity normalisation and resampling, on GPU or CPU.

The array back end is chosen once, when the operator is built: CuPy if it imports and sees a CUDA
device, NumPy/SciPy otherwise; the code path is the same either way.
"""

from __future__ import annotations

import logging

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.models.inference import array_backend, preprocess
from radnode.models.spec import ModelSpec

log = logging.getLogger(__name__)


class ModelPreprocessOperator(Operator):
    """Volume → the model's input grid (normalised, resampled to the model's spacing)."""

    def __init__(self, fragment, *args, model_spec: ModelSpec, prefer_gpu: bool = True, **kwargs):
        self.model_spec = model_spec
        self.backend = array_backend(prefer_gpu)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("prepared")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        prepared = preprocess(op_input.receive("volume"), self.model_spec, self.backend)
        log.info("preprocessed on %s to %s", self.backend.name, "x".join(map(str, prepared.array.shape[1:])))
        op_output.emit(prepared, "prepared")
