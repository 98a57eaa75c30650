"""A saved model is checked against its manifest: an edited, damaged or inconsistent directory is
refused with one line instead of loading (possibly under a wrong label)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import main
from duquant import packed
from duquant.packed import QuantizedLoadError, load_quantized

COMMON = ["--model", "tiny-olmoe", "--nsamples", "2", "--seqlen", "32", "--rotation_tokens", "64",
          "--block_size", "32", "--max_rotation_step", "8", "--eval_ppl", "", "--no-compare_fp"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    assert main.main(COMMON + ["--output_dir", str(root / "r"), "--save_dir", str(root / "q")]) == 0
    return root / "q"


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "q")
    return tmp_path / "q"


def _edit_config(q, change, reseal=False):
    """Edit quant_config.json; with `reseal`, also rewrite the manifest, as a careless tool would."""
    doc = json.loads((q / packed.QUANT_CONFIG).read_text())
    change(doc)
    (q / packed.QUANT_CONFIG).write_text(json.dumps(doc))
    if reseal:
        (q / packed.MANIFEST).write_text(json.dumps(packed.manifest(q, load_file(str(q / packed.WEIGHTS)))))


def _first_quantized(doc):
    return next(e for e in doc["linears"].values() if e["bits"] < 16)


def test_the_manifest_lists_every_tensor_and_file(saved):
    doc = json.loads((saved / packed.MANIFEST).read_text())
    tensors = load_file(str(saved / packed.WEIGHTS))
    assert set(doc["tensors"]) == set(tensors)
    assert packed.QUANT_CONFIG in doc["files"] and "config.json" in doc["files"]
    name = next(iter(tensors))
    assert doc["tensors"][name]["shape"] == list(tensors[name].shape) and len(doc["tensors"][name]["sha256"]) == 64


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["run"]["quant"].update(wbits=3), "was changed after saving"),
    (lambda d: d["run"].update(method="awq"), "was changed after saving"),
    (lambda d: _first_quantized(d).update(bits=3), "was changed after saving"),
    (lambda d: _first_quantized(d).update(shape=[7, 7]), "was changed after saving"),
    (lambda d: _first_quantized(d).pop("sym"), "was changed after saving"),
])
def test_an_edited_config_is_refused(copy, change, needle):
    _edit_config(copy, change)
    with pytest.raises(QuantizedLoadError, match=needle):
        load_quantized(copy)


@pytest.mark.parametrize("change, needle", [
    (lambda d: _first_quantized(d).update(bits=3), "outside the 3-bit range"),
    (lambda d: _first_quantized(d).update(shape=[7, 7]), "the config says"),
    (lambda d: _first_quantized(d).pop("sym"), "does not describe the saved tensors"),
    (lambda d: d.update(dtype="nonsense"), "does not describe the saved tensors"),
])
def test_an_edit_with_a_rewritten_manifest_is_still_refused(copy, change, needle):
    _edit_config(copy, change, reseal=True)
    with pytest.raises(QuantizedLoadError, match=needle):
        load_quantized(copy)


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["run"]["quant"].update(wbits=3), "the config says W3A4"),
    (lambda d: d["run"].update(method="awq"), "method 'awq', which this version does not know"),
    (lambda d: d["run"].pop("quant"), "lacks"),
])
def test_the_cli_refuses_a_wrong_label(copy, tmp_path, capsys, change, needle):
    _edit_config(copy, change, reseal=True)
    assert main.main(["--load", str(copy), "--eval_ppl", "", "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_changed_tensor_is_refused(copy):
    tensors = load_file(str(copy / packed.WEIGHTS))
    name = next(k for k in tensors if k.endswith(".qweight"))
    tensors[name] = tensors[name] ^ 1
    save_file(tensors, str(copy / packed.WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(QuantizedLoadError, match=f"tensor {name} has sha256"):
        load_quantized(copy)


def test_a_missing_tensor_or_manifest_is_refused(copy):
    tensors = load_file(str(copy / packed.WEIGHTS))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(copy / packed.WEIGHTS))
    with pytest.raises(QuantizedLoadError, match="does not hold the tensors"):
        load_quantized(copy)
    (copy / packed.MANIFEST).unlink()
    with pytest.raises(QuantizedLoadError, match="no manifest.json"):
        load_quantized(copy)


@pytest.mark.parametrize("cut", ["empty", "half", "header"])
def test_a_truncated_weights_file_is_refused(copy, cut):
    weights = copy / packed.WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "half": data[: len(data) // 2], "header": data[:6]}[cut])
    with pytest.raises(QuantizedLoadError, match="missing or corrupt"):
        load_quantized(copy)


def test_the_saved_model_still_loads_exactly(saved):
    model, tok, meta = load_quantized(saved)
    ids = tok("a short check", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert meta["run"]["method"] == "duquant"
