"""`fxopt report OUT`: the run's report as Markdown (plots as PNG files beside it) and as one self-contained HTML
page; the per-site measures and weight bytes the passes record for its plots; calibration text for the command
line (issue 15)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import fxopt
from fxopt import cli
from fxopt.model_spec import calibration_items, load_model
from fxopt.passes import ConvertToGQA, FuseLayerNorm, PermuteForNM, PruneNM
from fxopt.render import to_html
from tests.cli.test_cli import run

pytest.importorskip("transformers")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """`fxopt optimize` of a small Llama with SmoothQuant W8A8, then `fxopt report` of its directory."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["optimize", "LlamaForCausalLM", "--shape", "2,8", "--passes",
                     "fuse_layernorm,smoothquant", "-o", str(out)]) == cli.EXIT_OK
    assert cli.main(["report", str(out)]) == cli.EXIT_OK
    return out


def markdown_table(text: str, heading: str) -> list[list[str]]:
    block = text.split(f"## {heading}\n", 1)[1].strip().split("\n\n")[0]
    rows = [re.split(r"(?<!\\)\|", ln.strip())[1:-1] for ln in block.splitlines()]
    return [[c.strip() for c in r] for r in rows if not set("".join(r)) <= set("- ")]


def test_the_markdown_has_a_row_per_step_with_its_numerics_and_links_every_plot(quantized_run):
    report = fxopt.load(quantized_run / "model.pt2").report
    text = (quantized_run / "report.md").read_text()
    assert text.startswith("# fxopt report\n") and "LlamaForCausalLM from a small config" in text
    rows = markdown_table(text, "Steps")
    assert rows[0][:3] == ["step", "applied", "seconds"]
    assert [r[0] for r in rows[1:]] == [p.name for p in report.passes]
    sq = next(r for r in rows if r[0] == "smoothquant")
    assert sq[1] == "yes" and sq[5] == "cosine ≥ 0.95" and float(sq[4]) == pytest.approx(
        report["smoothquant"].numerics.cosine, abs=1e-6)
    links = re.findall(r"!\[([^]]+)]\(<(report_files/[^>]+\.png)>\)", text)
    titles = [t for t, _ in links]
    assert "Error after each step, against the bound it promised" in titles
    assert any(t.startswith("smoothquant: activation abs-max") for t in titles)
    assert any(t.startswith("Bytes of weights") for t in titles)
    for _, link in links:
        assert (quantized_run / link).read_bytes().startswith(PNG)
    assert "calibration: 8 batches of random token ids" in text  # this model has no tokenizer


def test_the_html_page_is_self_contained_and_embeds_the_same_plots(quantized_run):
    page = (quantized_run / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert len(images) == len(re.findall(r"!\[", (quantized_run / "report.md").read_text()))
    assert "<script" not in page and not re.search(r'(src|href)="(https?:|//|file:)', page)


def test_a_pt2_artifact_and_a_report_json_render_like_the_run_directory(quantized_run, tmp_path, capsys):
    code, _, _ = run(capsys, "report", str(quantized_run / "model.pt2"), "-o", str(tmp_path / "a"))
    assert code == cli.EXIT_OK
    code, _, _ = run(capsys, "report", str(quantized_run / "report.json"), "-o", str(tmp_path / "b"))
    assert code == cli.EXIT_OK
    steps = [markdown_table((tmp_path / d / "report.md").read_text(), "Steps") for d in "ab"]
    assert steps[0] == steps[1] == markdown_table((quantized_run / "report.md").read_text(), "Steps")


@pytest.mark.parametrize("what, named", [("missing", "no such file"), ("dir", "no report.json"),
                                         ("json", "not an fxopt report")])
def test_report_of_something_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys, what, named):
    path = {"missing": tmp_path / "nowhere", "dir": tmp_path, "json": tmp_path / "r.json"}[what]
    (tmp_path / "r.json").write_text(json.dumps({"passes": []}))
    code, _, err = run(capsys, "report", str(path))
    assert code == cli.EXIT_REFUSED and named in err and err.count("\n") == 1


def llama(**config):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=256, **config)
    return transformers.LlamaForCausalLM(cfg).eval(), (torch.randint(0, 256, (2, 8)),), {"use_cache": False}


def test_each_pass_measures_the_same_sites_before_and_after_and_the_pipeline_counts_weight_bytes():
    model, args, kwargs = llama()
    opt = fxopt.optimize(model, args, example_kwargs=kwargs,
                         passes=[FuseLayerNorm(), ConvertToGQA(num_kv_heads=2), PermuteForNM(), PruneNM()])
    gqa, perm, prune = (opt.report[n] for n in ("mha_to_gqa", "permute_nm", "prune_nm"))
    (cache,) = gqa.measures
    assert set(cache.before) == set(cache.after) and len(cache.before) == 2  # one per attention
    assert all(cache.after[k] * 2 == cache.before[k] for k in cache.before)  # 4 kv heads -> 2, exactly
    (kept,) = perm.measures
    assert kept.before and all(kept.after[k] >= kept.before[k] for k in kept.before)
    (pruned,) = prune.measures
    assert all(pruned.after[k] >= pruned.before[k] for k in pruned.before)  # with >= without the permutation
    # sites are named by the model's parameters, also where permute_nm has replaced the weight by a new constant
    assert pruned.before and all(re.fullmatch(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj\.weight", k)
                                 for k in pruned.before), sorted(pruned.before)
    bytes_ = {p.name: p.weight_bytes for p in opt.report.passes if p.applied}
    assert bytes_["fuse_layernorm"][0] == bytes_["fuse_layernorm"][1]
    assert bytes_["mha_to_gqa"][1] < bytes_["mha_to_gqa"][0]
    assert bytes_["mha_to_gqa"][1] == bytes_["permute_nm"][0]  # one pass's after is the next one's before
    gm = opt.graph_module
    expected = sum(t.untyped_storage().nbytes() for t in [*gm.parameters(), *gm.buffers()])
    assert bytes_["prune_nm"][1] == expected  # nothing of the graph is shared, so storages add up
    restored = fxopt.Report.from_dict(json.loads(opt.report.to_json()))
    assert restored.passes == opt.report.passes
    assert "K/V-cache bytes per token" in to_html(opt.report, {})


def test_smoothquants_plot_data_is_the_calibrated_abs_max_before_and_after_dividing_by_s():
    from fxopt.passes import SmoothQuant

    model, args, kwargs = llama()
    with torch.no_grad():  # an outlier channel at every norm, as in LLMs
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 40.0
    calibration = [((torch.randint(0, 256, (2, 8)),), kwargs) for _ in range(3)]
    opt = fxopt.optimize(model, args, example_kwargs=kwargs, calibration=calibration,
                         passes=[FuseLayerNorm(), SmoothQuant(smooth_only=True)])
    (m,) = opt.report["smoothquant"].measures
    qkv = [k for k in m.before if k.endswith("{q_proj,k_proj,v_proj}")]
    assert len(qkv) == 2 and all(m.after[k] < m.before[k] / 3 for k in qkv)  # the outlier flattened
    # the activation abs-max before smoothing is what the q/k/v input really reaches on the calibration data
    peaks = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _, inputs: peaks.append(inputs[0].abs().amax()))
    with torch.no_grad():
        for a, kw in calibration:
            model(*a, **kw)
    hook.remove()
    assert m.before["model.layers.0.self_attn.{q_proj,k_proj,v_proj}"] == pytest.approx(float(max(peaks)), rel=1e-5)


def test_calibration_text_for_an_encoder_is_padded_sentences_with_their_mask(tmp_path):
    loaded = load_model("minilm", (2, 8))
    (tmp_path / "calib.txt").write_text("The first sentence.\n\nA second, longer sentence of plain words.\nThird.\n")
    items, said = calibration_items(loaded, 2, 2, str(tmp_path / "calib.txt"))
    assert len(items) == 2 and "lines of" in said
    (ids,), kw = items[0]
    assert ids.shape[0] == 2 and kw["attention_mask"].shape == ids.shape and set(kw) == set(loaded.kwargs)
    texts = loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert texts == ["the first sentence.", "a second, longer sentence of plain words."]
    assert int(kw["attention_mask"][0].sum()) < ids.shape[1]  # the shorter row is padded, and masked


def test_calibration_without_a_tokenizer_is_random_ids_and_text_is_refused(capsys, tmp_path):
    loaded = load_model("LlamaForCausalLM", (2, 8))
    items, said = calibration_items(loaded, 3, 2, None)
    assert len(items) == 3 and "random token ids" in said and items[0][0][0].shape == (2, 8)
    (tmp_path / "calib.txt").write_text("words\n")
    code, _, err = run(capsys, "optimize", "LlamaForCausalLM", "--passes", "smoothquant",
                       "--calib-file", str(tmp_path / "calib.txt"), "-o", str(tmp_path / "o"))
    assert code == cli.EXIT_REFUSED and "--calib-file" in err and "no tokenizer" in err


# -- review findings: hostile report contents and calibration inputs ---------------------------------------------

def hostile_report():
    from fxopt.capture import CaptureInfo
    from fxopt.numerics import Numerics
    from fxopt.pass_base import ROUNDING, Measure
    from fxopt.report import PassReport

    capture = CaptureInfo(method="torch.export", seconds=0.1, dynamic_dims={}, static_dims={}, notes=[],
                          failed_attempts=[])
    measure = Measure("abs-max of <script>alert(1)</script> | $x^2$", "", {"p$^_$q": float("nan"), "b": 1.0},
                      {"p$^_$q": float("inf"), "b": 0.5}, log_scale=True)
    inf = Numerics(float("inf"), float("inf"), -1.0, 1.0, 0, False, "", 4)
    return fxopt.Report(capture, [
        PassReport("../../escaped", True, "exact", 0.1, {"x": 1}, None, ("n: <b>bold</b>\nsecond line",), inf,
                   ROUNDING, ("note | with pipe",), (measure,), (0, 10)),
        PassReport("skipped", False, "exact", 0.0, {}, "why\nnot <i>", ("why\nnot <i>",))])


def test_a_hostile_report_round_trips_and_renders_escaped_with_plot_files_inside_the_output(tmp_path):
    report = fxopt.Report.from_dict(json.loads(hostile_report().to_json()))  # inf/nan measures come back floats
    assert report.passes[0].measures[0].before["p$^_$q"] != report.passes[0].measures[0].before["p$^_$q"]  # NaN
    text = report.to_markdown(str(tmp_path / "plots dir"))
    assert "<script>" not in text and "<b>" not in text and "&lt;script&gt;" in text
    rows = markdown_table(text, "Steps")
    assert len(rows) == 3 and all(len(r) == len(rows[0]) for r in rows)  # newlines and pipes kept inside cells
    assert sorted(p.parent for p in tmp_path.rglob("*.png")) == [tmp_path / "plots dir"] * 3
    assert "(<" + str(tmp_path / "plots dir") in text  # a path with a space is still one link
    page = to_html(report, {"model": "<img src=x onerror=alert(1)>"})
    assert "<img src=x" not in page and "<script>" not in page


def test_report_of_a_run_with_a_malformed_run_record_or_an_unwritable_destination_exits_3(quantized_run, tmp_path,
                                                                                          capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text((quantized_run / "report.json").read_text())
    (bad / "run.json").write_text("{not json")
    code, _, err = run(capsys, "report", str(bad))
    assert code == cli.EXIT_REFUSED and "run.json" in err
    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "report", str(quantized_run), "-o", str(tmp_path / "a-file"))
    assert code == cli.EXIT_REFUSED and "cannot write the report" in err


def test_calibration_text_fits_the_models_positions_and_text_without_tokens_is_refused(tmp_path):
    import transformers

    from fxopt.model_spec import Loaded

    minilm = load_model("minilm", (2, 8))
    config = transformers.GPT2Config(n_positions=24, n_embd=32, n_layer=1, n_head=2,
                                     vocab_size=minilm.tokenizer.vocab_size)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    loaded = Loaded(gpt2, (torch.randint(0, 100, (2, 8)),), {"use_cache": False}, "gpt2", minilm.tokenizer)
    items, _ = calibration_items(loaded, 2, 2, None)
    assert [tuple(a[0].shape) for a, _ in items] == [(2, 24)] * 2  # packed rows, as long as its positions allow
    (tmp_path / "blank.txt").write_text("\u200b\n")  # a zero-width space: text to str.strip, no tokens
    with pytest.raises(fxopt.FxoptError, match="no tokens"):
        calibration_items(loaded, 1, 2, str(tmp_path / "blank.txt"))


def test_a_factory_with_its_own_float_inputs_calibrates_on_them(capsys, tmp_path):
    (tmp_path / "f.py").write_text("import torch\nfrom torch import nn\n\ndef make():\n"
                                   "    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), "
                                   "(torch.randn(2, 4, 8),)\n")
    code, out, _ = run(capsys, "optimize", f"{tmp_path / 'f.py'}:make", "--passes", "smoothquant",
                       "-o", str(tmp_path / "o"))
    assert code == cli.EXIT_OK and "calibration: the factory's own example inputs" in out
