"""Typed errors. Every message names the node, pass or option at fault."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters (for one-line error reports)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """The model could not be captured as a graph; lists each method tried and why it failed."""

    def __init__(self, model_name: str, attempts: list[tuple[str, str]]):
        self.attempts = attempts
        lines = [f"could not capture {model_name} as a torch.fx graph; tried:"]
        lines += [f"  - {how}: {why}" for how, why in attempts]
        super().__init__("\n".join(lines))


class MissingInputsError(FxoptError, ValueError):
    """Example inputs are required (capture, shape propagation and numerics checks run on them)."""


class UnknownPassError(FxoptError, KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(f"unknown pass {name!r}; known passes: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class PassOptionError(FxoptError, ValueError):
    def __init__(self, pass_name: str, option: str, problem: str):
        self.pass_name, self.option = pass_name, option
        super().__init__(f"pass {pass_name!r}: option {option!r} {problem}")


class RequirementError(FxoptError):
    """A pass requires something (calibration data, example inputs) that the pipeline cannot provide."""


class PassError(FxoptError):
    """A pass raised; names the pass and those that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name, self.before = pass_name, before
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass {pass_name!r} failed (passes run before it: {ran}): "
                         f"{type(cause).__name__}: {cause}")


class StructureError(FxoptError, ValueError):
    """The model's structure does not admit what a pass was asked to do (no attention to convert, a head count
    that does not divide); names the node and the numbers."""


class VerificationError(FxoptError):
    """The graph after a pass is malformed (lint, missing or changed shape/dtype metadata)."""


class NumericsError(FxoptError):
    """A pass broke its declared numerical contract on the example inputs."""


class UnsupportedOpError(FxoptError):
    """A backend has no translation for some nodes; lists every one of them."""

    def __init__(self, backend: str, nodes: list[str], origin: dict[str, str] | None = None):
        self.backend, self.nodes = backend, nodes
        origin = origin or {}
        listed = "\n".join(f"  - {n}" + (f" (introduced by pass {origin[n]!r})" if n in origin else "")
                           for n in nodes)
        super().__init__(f"{backend}: {len(nodes)} node(s) have no translation:\n{listed}")


class BackendError(FxoptError):
    """A backend failed on a model fxopt handed it (ONNX Runtime could not load the file, TVM could not build the
    module); names the backend and the step, with the backend's own exception chained."""

    def __init__(self, backend: str, step: str, error: BaseException):
        self.backend, self.step = backend, step
        super().__init__(f"{backend}: {step} failed ({type(error).__name__}: {first_line(error, 500)})")


class BackendMismatchError(FxoptError):
    """A compiled artifact's outputs on the example inputs differ from the optimized torch module's beyond the
    rounding of their dtype (`fxopt.compile(..., check_numerics=True)`); names the backend and the output."""

    def __init__(self, backend: str, target: str, output: str, detail: str):
        self.backend, self.target, self.output = backend, target, output
        super().__init__(f"{backend} ({target}): the compiled model's output {output} differs from the optimized "
                         f"torch module's on the example inputs: {detail}. This is a backend conversion bug; "
                         f"please report it with the model (compile(..., check_numerics=False) returns it "
                         f"anyway)")


class LoweringTableError(FxoptError, ValueError):
    """A backend's lowering table is malformed: a key that is not an op overload, or one the backend's
    importer cannot tell apart from another op."""


class CalibrationError(RequirementError):
    """Calibration data cannot serve the passes that need it (missing, empty, one-shot for several passes), or
    a pass's calibration spec names what the graph does not have; names the pass."""


class CalibrationInputError(CalibrationError, TypeError):
    """A calibration item does not match the captured signature; `index` is the item's position, `argument`
    the input at fault (None when the item as a whole is malformed)."""

    def __init__(self, index: int, argument: str | None, problem: str):
        self.index, self.argument = index, argument
        at = f"input {argument!r} of calibration item {index}" if argument else f"calibration item {index}"
        super().__init__(f"{at} {problem}")


class ExampleInputsError(FxoptError):
    """The captured model does not run on its example inputs (a dtype or device mismatch, a meta tensor), or
    they cannot be checked; says what to change."""


class InferenceOnlyError(FxoptError, RuntimeError):
    """A training-mode request to an optimized (inference) module: `opt.train()`."""


class ConversionError(FxoptError, TypeError):
    """A dtype conversion (`opt.half()`, `.to(torch.bfloat16)`) the optimized graph cannot follow: its quantized
    ops fix their output dtypes and keep fp32 scales, so the conversion is refused before anything changes."""


class DeviceUnavailableError(FxoptError, RuntimeError):
    """A backend target needs a device this machine does not have (`target="cuda"` without a GPU); raised before
    anything is built."""
