"""fxopt: a graph-level compiler for transformer inference on torch.fx."""

from . import ops  # noqa: F401  (defines the fxopt:: torch.library ops the optimized graphs use)
from .api import OptimizedModule, compile, export_onnx, export_tvm, optimize
from .errors import (CaptureError, FxoptError, MissingInputsError, NumericsError, PassError,
                     PassOptionError, RequirementError, UnknownPassError, UnsupportedOpError,
                     VerificationError)
from .pass_base import Exactness, Pass, PassContext, PassResult, Requirement, Tolerance
from .report import PassReport, Report

__all__ = [
    "optimize", "compile", "export_onnx", "export_tvm", "OptimizedModule", "Report", "PassReport",
    "Pass", "PassContext", "PassResult", "Requirement", "Exactness", "Tolerance",
    "FxoptError", "CaptureError", "MissingInputsError", "UnknownPassError", "PassOptionError",
    "RequirementError", "PassError", "VerificationError", "NumericsError", "UnsupportedOpError",
]
__version__ = "0.1.0"
