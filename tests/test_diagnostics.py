import pytest
import torch

import main
from duquant.diagnostics import expert_balance_std, summarize


def test_expert_balance_std_is_zero_when_balanced_and_matches_its_definition():
    assert expert_balance_std(torch.full((3, 8), 10.0), top_k=2) == pytest.approx(0.0)
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # 4 tokens, top-2, two layers
    u = counts[0] / 4  # usage frequency of each expert in layer 0
    assert expert_balance_std(counts, top_k=2) == pytest.approx(u.std().item() / 2)


def test_summarize_reports_routing_and_expert_counts():
    layers = [{"layer": 0, "moe": False},
              {"layer": 1, "moe": True, "topk_agreement": 0.9, "router_kl": 0.02, "expert_tokens": [3, 5],
               "expert_tokens_balanced": [4, 5], "fallback_experts": []}]
    router, experts = summarize(layers, top_k=1)
    assert router["mean_topk_agreement"] == pytest.approx(0.9)
    assert experts["per_layer"][0]["calibration_tokens_balanced"] == [4, 5]
    assert experts["balance_std_balanced"] < experts["balance_std"]


def test_plots_are_written(tmp_path):
    out = tmp_path / "run"
    assert main.main(["--model", "tiny-mixtral", "--method", "duquant", "--nsamples", "2", "--seqlen", "32",
                      "--eval_ppl", "", "--no-compare_fp", "--plots", "--plot_layer", "0",
                      "--output_dir", str(out)]) == 0
    for name in ("expert_load.png", "routing_agreement.png", "channel_absmax.png"):
        assert (out / name).stat().st_size > 1000


def test_plot_layer_out_of_range_is_one_line_error(tmp_path, capsys):
    assert main.main(["--model", "tiny-mixtral", "--method", "rtn", "--nsamples", "2", "--seqlen", "32",
                      "--eval_ppl", "", "--plots", "--plot_layer", "99", "--output_dir", str(tmp_path)]) == 2
    assert "--plot_layer 99" in capsys.readouterr().err
