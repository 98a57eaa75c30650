"""main.py end to end on a tiny model, and every bad input gives one clear line and exit 2."""
import json

import pytest

import main


def _run(capsys, *argv):
    rc = main.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fp_run_writes_results(tmp_path, capsys):
    rc, out, _ = _run(capsys, "--model", "tiny-mixtral", "--method", "fp", "--seqlen", "64", "--ppl_samples", "2",
                      "--eval_ppl", "wikitext2,c4", "--output_dir", str(tmp_path))
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("model", "method", "config", "ppl", "tasks", "timings", "peak_memory_mb", "versions", "seed"):
        assert key in res
    assert set(res["ppl"]) == {"wikitext2", "c4"} and all(v > 1 for v in res["ppl"].values())
    assert "wikitext2" in out


def test_seqlen_is_capped_with_notice(tmp_path, capsys):
    rc, out, _ = _run(capsys, "--model", "tiny-llama", "--method", "fp", "--seqlen", "4096", "--ppl_samples", "1",
                      "--eval_ppl", "wikitext2", "--output_dir", str(tmp_path))
    assert rc == 0 and "notice: --seqlen 4096 exceeds" in out
    assert json.loads((tmp_path / "results.json").read_text())["config"]["data"]["seqlen"] == 512


@pytest.mark.parametrize("argv, message", [
    (["--model", "./no/such/checkpoint"], "does not exist"),
    (["--model", "tiny-mixtral", "--wbits", "9"], "--wbits 9 is out of range"),
    (["--model", "tiny-mixtral", "--abits", "1"], "--abits 1 is out of range"),
    (["--model", "tiny-mixtral", "--seqlen", "8"], "--seqlen 8 is out of range"),
    (["--model", "tiny-mixtral", "--eval_ppl", "ptb"], "--eval_ppl 'ptb' is unknown"),
    (["--model", "tiny-llama", "--route_all_tokens", "--seqlen", "64"], "require an MoE model"),
    (["--model", "tiny-llama", "--eaquant", "--seqlen", "64"], "require an MoE model"),
    (["--model", "tiny-mixtral", "--method", "rtn", "--router_align"], "build on DuQuant"),
    (["--model", "tiny-mixtral", "--smooth_aggregate", "mean"], None),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    if message is None:  # argparse rejects it: usage line plus one error line
        with pytest.raises(SystemExit) as e:
            main.main([*argv, "--output_dir", str(tmp_path / "out")])
        assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
        return
    rc, out, err = _run(capsys, *argv, "--output_dir", str(tmp_path / "out"))
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_data_file(monkeypatch, tmp_path, capsys):
    from duquant import data

    monkeypatch.setitem(data.FILES, "wikitext2", tmp_path / "missing.jsonl")
    rc, _, err = _run(capsys, "--model", "tiny-mixtral", "--method", "fp", "--seqlen", "64", "--eval_ppl", "wikitext2",
                      "--output_dir", str(tmp_path / "out"))
    assert rc == 2 and "is missing" in err and not (tmp_path / "out").exists()
