"""The base of the operators that turn a pipeline's segments into the result its writers take."""

from __future__ import annotations

from holoscan.core import Operator

from radnode.outputs.algorithm import AlgorithmInfo


class MeasurementOperator(Operator):
    """Measures segments into a :class:`radnode.results.PipelineResult` attributed to ``algorithm`` (the name
    and version the SR and FHIR writers record with every measurement)."""

    def __init__(self, fragment, *args, algorithm: AlgorithmInfo, **kwargs):
        self.algorithm = algorithm
        super().__init__(fragment, *args, **kwargs)
