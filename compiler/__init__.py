"""fxopt: a graph-level compiler for transformer inference on torch.fx."""

from . import ops  # noqa: F401  (defines the fxopt:: torch.library ops the optimized graphs use)
from .api import OptimizedModule, compile, export_onnx, export_tvm, optimize
from .artifact import ArtifactArgumentError, ArtifactError, load, save
from .errors import (
                     BackendError,
                     BackendMismatchError,
                     CalibrationError,
                     CalibrationInputError,
                     CaptureError,
                     ConversionError,
                     DeviceUnavailableError,
                     ExampleInputsError,
                     FxoptError,
                     InferenceOnlyError,
                     MissingInputsError,
                     NumericsError,
                     PassError,
                     PassOptionError,
                     RequirementError,
                     UnknownPassError,
                     UnsupportedOpError,
                     VerificationError,
)
from .pass_base import Exactness, Pass, PassContext, PassResult, Requirement, Tolerance
from .report import PassReport, Report
from .signature import InputMismatchError
from .structure import Structure, analyze, analyze_graph

__all__ = [
                     "ArtifactArgumentError",
                     "ArtifactError",
                     "BackendError",
                     "BackendMismatchError",
                     "CalibrationError",
                     "CalibrationInputError",
                     "CaptureError",
                     "ConversionError",
                     "DeviceUnavailableError",
                     "ExampleInputsError",
                     "Exactness",
                     "FxoptError",
                     "InferenceOnlyError",
                     "InputMismatchError",
                     "MissingInputsError",
                     "NumericsError",
                     "OptimizedModule",
                     "Pass",
                     "PassContext",
                     "PassError",
                     "PassOptionError",
                     "PassReport",
                     "PassResult",
                     "Report",
                     "Requirement",
                     "RequirementError",
                     "Structure",
                     "Tolerance",
                     "UnknownPassError",
                     "UnsupportedOpError",
                     "VerificationError",
                     "analyze",
                     "analyze_graph",
                     "compile",
                     "export_onnx",
                     "export_tvm",
                     "load",
                     "optimize",
                     "save",
]
__version__ = "0.1.0"
