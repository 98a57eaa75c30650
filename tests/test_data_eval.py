"""Bundled data is built as GPTQ builds it; layer-wise perplexity equals a direct computation."""
import math

import pytest
import torch

from duquant import data
from duquant.data import DataError, calibration_segments, ppl_segments, ppl_text
from duquant.evaluate import perplexity
from duquant.layerwise import _forward, advance, capture_layer_inputs
from models import get_spec
from models.spec import decoder_layers
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


def test_large_calibration_request_draws_the_same_windows(monkeypatch):
    """Above SMALL_REQUEST every document is encoded up front (in chunks); the windows drawn must
    be those of encoding each drawn document on its own."""
    tok = tiny_tokenizer()
    big = calibration_segments("c4", tok, 40, 1024, seed=3)
    assert 40 * 1024 > data.SMALL_REQUEST
    monkeypatch.setattr(data, "SMALL_REQUEST", 10**9)
    assert torch.equal(big, calibration_segments("c4", tok, 40, 1024, seed=3))


def test_advance_replaces_inputs_by_the_layer_outputs():
    model, tok = tiny_model("mixtral")
    spec = get_spec(model)
    hidden, kwargs = capture_layer_inputs(model, spec, ppl_segments("wikitext2", tok, 32, max_segments=3), "cpu", 2)
    layer = decoder_layers(model, spec)[0]
    expected = [_forward(layer, x, kwargs) for x in hidden]
    moved = advance(layer, hidden, kwargs)
    assert moved is hidden and len(moved) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(moved, expected))
