"""Left-padded batches on both backends: a query whose mask allows no key gets torch's zeros (its safe softmax),
not a uniform average (review finding: a padded Llama batch failed the compile check on TVM and ORT)."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.testing import assert_within
from tests.models.hf_families import FAMILIES


def left_padded(batch: int, seq: int, pad: int, seed: int):
    (ids,), _ = FAMILIES["llama_gqa"].inputs(batch, seq, seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, :pad] = 0
    return ids, {"attention_mask": mask, "use_cache": False}


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_left_padded_causal_batch_matches_torch(backend):
    pytest.importorskip(backend)
    model = FAMILIES["llama_gqa"].build("sdpa")
    ids, kwargs = left_padded(2, 8, 3, 0)
    opt = fxopt.optimize(model, (ids,), example_kwargs=kwargs)
    run = fxopt.compile(opt, backend=backend)  # the example batch is padded: checked here already
    ids, kwargs = left_padded(3, 6, 4, 1)
    with torch.no_grad():
        assert_within(run(ids, **kwargs).logits, model(ids, **kwargs).logits)
