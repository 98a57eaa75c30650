"""The shipped zoo checkpoints load like any hub checkpoint; the training script runs and resumes."""
import json

import pytest
import torch

from models import ZOO, ZOO_DIR, get_spec, load_model
from models.zoo import train

SHIPPED = [name for name in sorted(ZOO) if (ZOO_DIR / name / "config.json").exists()]
DENSE = {"demo-llama-s", "demo-llama-m"}  # dense Llamas for comparisons with the published DuQuant code


def test_the_default_model_is_shipped():
    assert set(SHIPPED) == {"demo-mixtral", "demo-olmoe", "demo-deepseek"} | DENSE


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_loads_and_runs(name):
    model, tok = load_model(name)
    spec = get_spec(model)
    is_moe = any(spec.is_moe_layer(model.config, i) for i in range(model.config.num_hidden_layers))
    assert is_moe == (name not in DENSE) and (spec.router is None) == (name in DENSE)
    size = sum(f.stat().st_size for f in (ZOO_DIR / name).glob("*.safetensors"))
    assert size < 50 * 2**20
    ids = tok("It was a bright cold day in April, and the clocks were striking thirteen." * 4, return_tensors="pt").input_ids[:, :64]
    assert ids[0, 0] == tok.bos_token_id and ids.shape[1] == 64
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    card = (ZOO_DIR / name / "README.md").read_text()
    assert name in DENSE or ("Expert load" in card and "Activation outliers" in card)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek", "llama-s"])
def test_training_smoke_runs_and_resumes(arch, tmp_path, capsys):
    common = ["--arch", arch, "--smoke", "--run_dir", str(tmp_path), "--batch", "2", "--seqlen", "64",
              "--save_every", "10", "--eval_every", "10", "--warmup", "2"]
    train.main(common + ["--max_steps", "10"])
    train.main(common + ["--max_steps", "20"])
    assert "resumed" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 20 and [h["step"] for h in state["history"]] == [10, 20]
    assert state["history"][-1]["val_ppl"] < state["history"][0]["val_ppl"] * 1.5
    train.main(common + ["--export", str(tmp_path / "export")])
    meta = json.loads((tmp_path / "export" / "training.json").read_text())
    assert meta["steps"] == 20
    model, _ = load_model(str(tmp_path / "export"))
    assert model.config.hidden_size == 64
