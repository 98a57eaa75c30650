"""Bundled data is built as GPTQ builds it; layer-wise perplexity equals a direct computation."""
import math

import pytest
import torch

from duquant import data
from duquant.data import DataError, calibration_segments, ppl_segments, ppl_text
from duquant.evaluate import perplexity
from models import get_spec
from models.tiny import tiny_model, tiny_tokenizer

from .conftest import ALL_ARCHS


def test_wikitext2_text_is_gptq_join():
    text = ppl_text("wikitext2")
    assert len(text.encode("utf-8")) == 1_296_370  # data/README_shared.md
    assert text.startswith("\n\n = Robert Boulter = \n")  # the first row is empty


def test_ppl_segments_shapes():
    tok = tiny_tokenizer()
    wiki = ppl_segments("wikitext2", tok, 256)
    assert wiki.shape[1] == 256 and wiki.shape[0] > 100
    assert ppl_segments("c4", tok, 256).shape == (256, 256)
    assert ppl_segments("wikitext2", tok, 256, max_segments=3).shape == (3, 256)


@pytest.mark.parametrize("name", ["wikitext2", "c4", "gutenberg"])
def test_ppl_windows_from_a_prefix_equal_the_full_tokenization(name):
    tok = tiny_tokenizer()
    full = tok(ppl_text(name), return_tensors="pt", verbose=False).input_ids[0]
    for seqlen, windows in [(128, 3), (256, 20), (2048, 5)]:
        seg = ppl_segments(name, tok, seqlen, windows)
        assert seg.shape == (windows, seqlen) and torch.equal(seg.flatten(), full[: seg.numel()])


def test_calibration_is_seeded():
    tok = tiny_tokenizer()
    a = calibration_segments("c4", tok, 4, 128, seed=1)
    b = calibration_segments("c4", tok, 4, 128, seed=1)
    c = calibration_segments("c4", tok, 4, 128, seed=2)
    assert a.shape == (4, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert calibration_segments("gutenberg", tok, 3, 128, seed=0).shape == (3, 128)


def test_missing_data_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(data.FILES, "wikitext2", tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match="is missing"):
        ppl_text("wikitext2")


def test_too_long_calibration_window_errors():
    with pytest.raises(DataError, match="lower --seqlen"):
        ppl_segments("wikitext2", tiny_tokenizer(), 10**7)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layerwise_perplexity_matches_direct_loss(arch):
    model, tok = tiny_model(arch)
    seg = ppl_segments("wikitext2", tok, 64, max_segments=3)
    ours = perplexity(model, get_spec(model), seg, batch_size=2)
    with torch.no_grad():
        direct = math.exp(torch.stack([model(s[None], labels=s[None]).loss for s in seg]).mean().item())
    assert ours == pytest.approx(direct, rel=1e-5)
