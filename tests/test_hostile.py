"""Hostile input: whatever a user types or whatever state the disk is in, main.py and the zoo tool end
with one `error:` line and exit status 2 (130 for Ctrl-C), never a traceback, a silently wrong
number or a half-written file; temporaries of killed runs are cleaned up."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import duquant.pipeline as pipeline
import main
from eaquant_ext import cli
from duquant.config import ConfigError
from models.files import WriteError, remove_stale_temporaries, write_dir_atomically, write_file_atomically
from models.tiny import tiny_model
from models.zoo import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["--seqlen", "32", "--ppl_samples", "1", "--eval_ppl", "wikitext2"]
QUANT = ["--model", "tiny-olmoe", "--nsamples", "2", "--seqlen", "32", "--rotation_tokens", "64", "--block_size", "32",
         "--max_rotation_step", "8", "--eval_ppl", "", "--no-compare_fp"]


def _last_line(err: str, code: int) -> str:
    """The one `error:` line (exit 2) or `interrupted` line (exit 130) among progress bars on stderr."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:" if code == 2 else "interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _one_error(capsys, argv, code=2) -> str:
    assert main.main(argv) == code
    return _last_line(capsys.readouterr().err, code)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (root only); skips the test where none can be mounted."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs on this machine")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("argv, needle", [
    (["--device", "mps"], "--device 'mps' is not supported"),
    (["--device", "gpu0"], "--device 'gpu0' is not supported"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0 is out of range"),
    (["--rotation_tokens", "0"], "--rotation_tokens 0 is out of range"),
    (["--ppl_samples", "-1"], "--ppl_samples -1 is out of range"),
    (["--ppl_samples", "0"], "--ppl_samples 0 is out of range"),
    (["--nsamples", "0"], "--nsamples 0 is out of range"),
    (["--seed", str(2**70)], "is out of range; use a value in [0, "),
    (["--seed", "-3"], "--seed -3 is out of range"),
    (["--swc", "nan"], "--swc nan is out of range"),
    (["--alpha", "inf"], "--alpha inf is out of range"),
    (["--percdamp", "1"], "--percdamp 1.0 is out of range"),
    (["--kl_top", "101"], "--kl_top 101 is out of range"),
    (["--kv_bits", "1"], "--kv_bits 1 is out of range"),
    (["--plot_layer", "-1"], "--plot_layer -1 is out of range"),
    (["--model", "tiny-gpt9"], "unknown tiny model tiny-gpt9; choose from tiny-mixtral"),
])
def test_bad_options_fail_before_any_work(argv, needle, tmp_path, capsys):
    err = _one_error(capsys, ["--model", "tiny-mixtral", *FAST, "--output_dir", str(tmp_path / "out"), *argv])
    assert err.startswith("error: ") and needle in err
    assert not (tmp_path / "out").exists()


def test_the_cli_as_a_process_over_bad_inputs(tmp_path):
    """`python main.py` itself (exit status, stderr), side by side, failing before and while loading."""
    model, tok = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="1MB")
    tok.save_pretrained(tmp_path / "ckpt")
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    table = {
        "before_loading": (["--model", "tiny-mixtral", "--device", "gpu0"], "--device 'gpu0' is not supported"),
        "while_loading": (["--model", str(tmp_path / "ckpt")], "is missing, empty or truncated"),
    }  # every other class runs in-process above and below (a process costs seconds of imports)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "main.py", *argv, *FAST, "--output_dir", str(tmp_path / name)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in table.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and table[name][1] in _last_line(err, 2), (name, err[-2000:])
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_damaged_shard_is_one_line(damage, stream, tmp_path, capsys):
    model, tok = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="1MB")
    tok.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[-1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(b"" if damage == "empty" else shard.read_bytes()[:5000])
    err = _one_error(capsys, ["--model", str(tmp_path / "ckpt"), *FAST, "--output_dir", str(tmp_path / "r")]
                     + ["--stream"] * stream)
    assert f"checkpoint file {shard} is missing, empty or truncated" in err and not (tmp_path / "r").exists()


def test_every_numeric_option_has_a_range():
    args = cli.parse_args([])[0]
    numeric = {k for k, v in vars(args).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric - set(cli.RANGES) - set(cli.SAVED_BITS) == set()


def test_abbreviated_options_are_not_guessed(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--mod", "tiny-mixtral"])
    assert e.value.code == 2 and "unrecognized arguments: --mod" in capsys.readouterr().err


# ----------------------------------------------------------------------------- paths


def test_output_paths_that_cannot_work(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    cases = [
        (["--output_dir", str(tmp_path / "file")], "is a file, not a directory"),
        (["--output_dir", str(tmp_path / "file" / "sub")], "which is a file, not a directory"),
        (["--output_dir", str(tmp_path / ("x" * 250))], "is too long"),
        (["--output_dir", str(tmp_path / "ok"), "--save_dir", str(tmp_path / "file" / "q")], "which is a file"),
        (["--output_dir", str(tmp_path / "ok"), "--stream", "--stream_dir", str(tmp_path / ("y" * 240))], "is too long"),
    ]
    for argv, needle in cases:
        err = _one_error(capsys, ["--model", "tiny-mixtral", *FAST, *argv])
        assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_a_read_only_directory_is_refused(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        err = _one_error(capsys, ["--model", "tiny-mixtral", *FAST, "--output_dir", str(ro / "out")])
    assert "cannot write in" in err and "Read-only file system" in err


def test_not_enough_space_for_the_estimated_output(tmp_path, capsys):
    model, tok = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    with tmpfs(tmp_path / "small", "size=256k") as small:
        err = _one_error(capsys, ["--model", str(tmp_path / "ckpt"), *FAST, "--output_dir", str(tmp_path / "r"),
                                  "--save_dir", str(small / "q")])
        assert "needs at least" in err and list(small.iterdir()) == []


def test_a_full_disk_during_the_save(tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=512k") as small:
        err = _one_error(capsys, [*QUANT, "--output_dir", str(tmp_path / "r"), "--save_dir", str(small / "q")])
        assert "cannot write" in err and "No space left on device" in err
        assert list(small.iterdir()) == []  # the temporary directory is gone


def test_a_file_size_limit_during_the_save(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run([sys.executable, "main.py", *QUANT, "--method", "rtn", "--output_dir", str(tmp_path / "r"),
                        "--save_dir", str(tmp_path / "q")], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "File too large" in errors[0] and "ulimit -f" in errors[0]
    assert not any(p.name.startswith(".q.") for p in tmp_path.iterdir())


def test_write_errors_name_the_file_and_remove_the_temporary(tmp_path, monkeypatch):
    def full(tmp):
        tmp.write_bytes(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr("models.files.NEARLY_FULL_BYTES", 1 << 62)  # this disk counts as full
    with pytest.raises(WriteError, match=r"cannot write .*a\.pt: No space left on device"):
        write_file_atomically(tmp_path / "a.pt", full)
    with pytest.raises(WriteError, match="No space left"):
        write_dir_atomically(tmp_path / "d", lambda tmp: full(tmp / "w"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr("models.files.NEARLY_FULL_BYTES", 0)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # not an I/O failure: passed on unchanged
        write_file_atomically(tmp_path / "a.pt", full)


# ----------------------------------------------------------------------------- leftovers of killed runs


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / "q").mkdir()
    for name in (f".q.tmp-{dead}", f".q.old-{dead}", f".q.tmp-{alive}"):
        (tmp_path / name).mkdir()
    (tmp_path / f".results.tmp-{dead}.json").write_text("{")
    (tmp_path / ".other.tmp-1").mkdir()
    assert {p.name for p in remove_stale_temporaries(tmp_path / "q")} == {f".q.tmp-{dead}", f".q.old-{dead}"}
    assert [p.name for p in remove_stale_temporaries(tmp_path / "results.json")] == [f".results.tmp-{dead}.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", f".q.tmp-{alive}", "q"]


def test_a_model_caught_between_two_renames_is_restored(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".q.old-{dead}").mkdir()
    (tmp_path / f".q.old-{dead}" / "quant_config.json").write_text("{}")
    (tmp_path / f".q.tmp-{dead}").mkdir()
    remove_stale_temporaries(tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and (tmp_path / "q" / "quant_config.json").exists()


# ----------------------------------------------------------------------------- checkpoints and interruption


def _interrupt_at_layer(monkeypatch, index, error=KeyboardInterrupt):
    resolve = pipeline.resolve

    def interrupted(spec, layer, config, i):
        if i == index:
            raise error()
        return resolve(spec, layer, config, i)

    monkeypatch.setattr(pipeline, "resolve", interrupted)


def test_ctrl_c_says_how_to_resume_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    argv = [*QUANT, "--output_dir", str(tmp_path / "r")]
    _interrupt_at_layer(monkeypatch, 1)
    err = _one_error(capsys, argv, code=130)
    partial = tmp_path / "r" / "partial"
    assert err == f"interrupted; rerun the same command to resume from {partial} (layers done: 1)"
    monkeypatch.undo()
    assert main.main(argv) == 0
    assert "resumed: layers 0..0" in capsys.readouterr().out and not partial.exists()


def test_a_refusal_before_the_first_layer_leaves_nothing(tmp_path, capsys, monkeypatch):
    _interrupt_at_layer(monkeypatch, 0, lambda: ConfigError("refused at layer 0"))
    assert "refused at layer 0" in _one_error(capsys, [*QUANT, "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    _interrupt_at_layer(monkeypatch, 0)
    assert "nothing to resume" in _one_error(capsys, [*QUANT, "--output_dir", str(tmp_path / "r")], code=130)
    assert not (tmp_path / "r").exists()


def test_a_damaged_checkpoint_names_no_resume(tmp_path, capsys, monkeypatch):
    argv = [*QUANT, "--output_dir", str(tmp_path / "r")]
    _interrupt_at_layer(monkeypatch, 1)
    main.main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    layer = tmp_path / "r" / "partial" / "layer0.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    err = _one_error(capsys, argv)
    assert "holds a damaged checkpoint" in err and "--no-resume" in err
    assert main.main([*argv, "--no-resume"]) == 0


def test_a_real_sigint_ends_with_one_line(tmp_path):
    out = tmp_path / "r"
    # A shell's background job inherits SIGINT ignored, and so would the run (Python then installs no
    # Ctrl-C handler): the run gets the default disposition whatever this process inherited.
    proc = subprocess.Popen([sys.executable, "main.py", "--model", "tiny-deepseek", "--nsamples", "4", "--seqlen", "64",
                             "--block_size", "32", "--eval_ppl", "wikitext2", "--ppl_samples", "8", "--no-compare_fp",
                             "--output_dir", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress = out / "partial" / "progress.json"
    deadline = time.time() + 240
    while not progress.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    done = json.loads(progress.read_text())["done"]
    assert err.strip().splitlines()[-1] == f"interrupted; rerun the same command to resume from {out / 'partial'} " \
                                           f"(layers done: {done})"


# ----------------------------------------------------------------------------- --load


def test_load_refuses_options_it_cannot_apply(tmp_path, capsys):
    for argv, needle in [
        (["--model", "demo-mixtral"], "--model cannot apply to --load"),
        (["--method", "rtn", "--save_dir", str(tmp_path / "q2")], "--method, --save_dir cannot apply to --load"),
        (["--alpha", "0.5"], "--alpha cannot apply to --load"),
        (["--no-resume"], "--no-resume cannot apply"),
    ]:
        err = _one_error(capsys, ["--load", str(tmp_path / "q"), "--output_dir", str(tmp_path / "r"), *argv])
        assert needle in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the zoo tool


def _trained(tmp_path) -> list[str]:
    common = ["--arch", "mixtral", "--smoke", "--run_dir", str(tmp_path / "run"), "--batch", "2", "--seqlen", "32",
              "--save_every", "2", "--eval_every", "2", "--warmup", "1"]
    train.main([*common, "--max_steps", "2"])
    return common


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return _last_line(capsys.readouterr().err, 2)


def test_zoo_export_never_replaces_a_model_unasked(tmp_path, capsys):
    shipped = tmp_path / "demo"
    shipped.mkdir()
    for name in ("config.json", "README.md", "card.json"):
        (shipped / name).write_text("shipped")
    assert "step 0" in _fails(capsys, ["--arch", "mixtral", "--smoke", "--run_dir", str(tmp_path / "none"),
                                       "--export", str(shipped)])
    assert not (tmp_path / "none").exists()
    common = _trained(tmp_path)
    assert "pass --force" in _fails(capsys, [*common, "--export", str(shipped)])
    assert (shipped / "README.md").read_text() == "shipped"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("text")
    assert "not an exported model" in _fails(capsys, [*common, "--export", str(tmp_path / "data"), "--force"])
    train.main([*common, "--export", str(shipped), "--force"])
    assert json.loads((shipped / "training.json").read_text())["steps"] == 2


def test_zoo_smoke_runs_stay_out_of_the_real_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "RUNS", tmp_path)
    train.main(["--arch", "mixtral", "--smoke", "--batch", "2", "--seqlen", "32", "--max_steps", "1", "--eval_every", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"] and (tmp_path / "smoke" / "mixtral" / "checkpoint.pt").exists()
    capsys.readouterr()
    shutil.copytree(tmp_path / "smoke" / "mixtral", tmp_path / "mixtral")
    assert "checkpoint of another model" in _fails(capsys, ["--arch", "mixtral", "--max_steps", "1"])


def test_readme_commands_touch_no_shipped_files():
    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith(("python ", "nohup ", "mkdir ", "bash "))]
    for line in commands:
        for target in ("--export", "--save_dir", "--output_dir", "model_card.py", ">"):
            if target in line:
                written = line.split(target, 1)[1].split()[0]
                assert not written.startswith(("models/zoo/demo-", "data/", "models/zoo/tokenizer")), line
        if "nohup" in line and "runs/" in line:
            assert line.startswith("mkdir -p "), line
