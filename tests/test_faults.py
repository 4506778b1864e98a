"""Faults: a run killed (SIGKILL) at any step or in the middle of a checkpoint write resumes to
bitwise the same adapter; SIGINT/SIGTERM stop at a step boundary with a checkpoint, on one
process and on two (Ctrl-C to the process group, SIGTERM to the launcher alone: both processes
stop at the same step, rank 0 alone speaks); a signal during the export, `eval`, `merge` or
`select-data` leaves no half-written output and one line; damaged checkpoints are detected by
their manifest; a read-only or full output location fails before training; a failed
checkpoint write or a NaN loss leaves the last good checkpoint usable.

The killed runs are real `peftune train` processes. To kill them at a chosen point on a busy
machine (a tiny step takes ~10 ms), they run through a test-only wrapper that holds the
process at that point (after step k's metrics line, or before step k's manifest) until the
test releases it; the test polls the run directory, never sleeps a fixed time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    adapter_weights,
    assert_one_error_line,
    main_in_process,
    read_metrics,
    run_cli,
    write_recipe,
)

import peftune
from peftune.errors import InputError, TrainingError
from peftune.recipe import load_recipe
from peftune.train import checkpoint as ckpt
from peftune.train import interrupts as train_signals

STEPS = 10
REPO = Path(peftune.__file__).resolve().parent.parent

GATES = r'''
import json, os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a runner

def hold(release):
    deadline = time.time() + 120
    while not Path(release).exists() and time.time() < deadline:
        time.sleep(0.01)

for kind, step, release in json.loads(os.environ["FAULT_GATES"]):
    if kind == "metrics":  # hold after step k's metrics line (before its checkpoint)
        from peftune.train import reporting
        def write(self, record, _real=reporting.MetricsLog.write, _step=step, _rel=release):
            _real(self, record)
            if record.get("step") == _step and "loss" in record:
                hold(_rel)
        reporting.MetricsLog.write = write
    elif kind == "manifest":  # hold inside step k's checkpoint write, before its manifest
        from peftune.train import checkpoint
        def manifest(directory, _real=checkpoint.write_manifest, _step=step, _rel=release):
            if directory.name == f".tmp-step-{_step}":
                hold(_rel)
            _real(directory)
        checkpoint.write_manifest = manifest
    elif kind == "setup":  # hold before the model loads (the release file is never made)
        from peftune.train import setup
        def build(*args, _real=setup.build_training, _rel=release, **kwargs):
            Path(_rel + ".held").write_text("")
            hold(_rel)
            return _real(*args, **kwargs)
        setup.build_training = build
    elif kind == "nan":  # the loss of optimizer step k is NaN (one micro-batch per step)
        from peftune.train import objectives  # where the sft loss is computed
        calls = [0]
        def poisoned(model, batch, _real=objectives.token_loss_sum, _step=step, **kwargs):
            calls[0] += 1
            loss = _real(model, batch, **kwargs)
            return loss * float("nan") if calls[0] == _step else loss
        objectives.token_loss_sum = poisoned
    elif kind == "steps":  # each process writes the step its loop stopped at
        from peftune.train import run
        def run_loop(*args, _real=run.run_loop, _rel=release, **kwargs):
            state = _real(*args, **kwargs)
            Path(f"{_rel}.rank{os.environ.get('RANK', '0')}").write_text(str(state.step))
            return state
        run.run_loop = run_loop
    elif kind == "eval-write":  # hold in eval's temp output dir, after the predictions
        from peftune.evaluate import report
        def plot(*args, _real=report.plot_metrics, _rel=release, **kwargs):
            path = _real(*args, **kwargs)
            Path(_rel + ".held").write_text("")
            hold(_rel)
            return path
        report.plot_metrics = plot
    elif kind == "export":  # hold inside the export, once the adapter's weights are written
        from peftune.train import run
        def export(built, out, _real=run.export, _rel=release):
            real_export = built.hooks.export
            def slow(model, tmp, tokenizer):
                real_export(model, tmp, tokenizer)
                Path(_rel + ".held").write_text("")
                hold(_rel)
            built.hooks.export = slow
            return _real(built, out)
        run.export = export
'''

WRAPPER = GATES + '''
from peftune.cli import main
sys.argv = ["peftune", *sys.argv[1:]]
main()
'''

# The processes of `--nproc 2` are started by the launcher, not through WRAPPER: they import
# the gates from a sitecustomize.py on PYTHONPATH (only processes started by a launcher).
SITECUSTOMIZE = "import os\nif 'RANK' in os.environ and 'FAULT_GATES' in os.environ:\n" + \
    "".join(f"    {line}\n" for line in GATES.strip().splitlines())


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PEFTUNE_DEBUG": "",
            "PEFTUNE_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _cli(tmp_path: Path, *args: str, prefix: tuple = ()) -> subprocess.CompletedProcess:
    return run_cli(*args, prefix=prefix, timeout=180, env=_env(tmp_path))


class Held:
    """A `peftune` process run through the wrapper, held at its gates; `launched`: the
    processes a `--nproc N` launcher starts are held too. Its own process group (as a
    terminal's foreground job), so that Ctrl-C can be sent to the whole group."""

    def __init__(self, tmp_path: Path, recipe: Path | None, *args: str,
                 gates: list[tuple[str, int]], verb: str = "train", launched: bool = False):
        self.releases = [tmp_path / f"release-{kind}-{step}-{time.monotonic_ns()}"
                         for kind, step in gates]
        wrapper = tmp_path / "fault_wrapper.py"
        wrapper.write_text(WRAPPER)
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
        env = {**_env(tmp_path), "FAULT_GATES": json.dumps(
            [[kind, step, str(rel)] for (kind, step), rel in zip(gates, self.releases, strict=True)])}
        if launched:
            site = tmp_path / "site"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
            env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
            env.pop("WORLD_SIZE", None)
        command = [sys.executable, str(wrapper), verb, *([str(recipe)] if recipe else []), *args]
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                         env=env, start_new_session=True)

    def wait_for(self, condition, what: str, timeout: float = 150) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before {what}: "
                                     f"{self.stderr()}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"{what} did not happen in {timeout}s")
            time.sleep(0.02)

    def release(self, i: int) -> None:
        self.releases[i].write_text("go")

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def ctrl_c(self) -> None:
        """SIGINT to the whole process group, as a terminal sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 150) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def _metrics_line(run: Path, step: int):
    def seen() -> bool:
        path = run / "metrics.jsonl"
        if not path.exists():
            return False
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step") == step and "loss" in record:
                return True
        return False
    return seen


def _recipe(tmp_path: Path, name: str, tiny_model_dir: Path, text_data: dict, **train) -> Path:
    """Every recipe here trains the same thing (LoRA with dropout, so the RNG matters, and a
    warmup + cosine schedule); only output.dir and the checkpoint keys differ."""
    keys = {"max_steps": STEPS, "save_every": 1, "keep_checkpoints": 3, "scheduler": "cosine",
            "warmup_ratio": 0.2, "log_every": 1, **train}
    return write_recipe(tmp_path / f"{name}.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / name,
                        adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        train=keys)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, text_data) -> dict:
    """The uninterrupted run every faulted run must reproduce bitwise."""
    tmp_path = tmp_path_factory.mktemp("reference")
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data)
    result = _cli(tmp_path, "train", str(recipe))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    return {"run": run, "adapter": adapter_weights(run)}


def _assert_same_adapter(run: Path, reference: dict) -> None:
    got = adapter_weights(run)
    assert got.keys() == reference["adapter"].keys()
    for name, tensor in reference["adapter"].items():
        assert torch.equal(got[name], tensor), name
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, STEPS + 1))  # each step logged once across the restarts


def _steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run)]


# ---- SIGKILL ----------------------------------------------------------------------------------

@pytest.mark.slow  # default run: a torn checkpoint falls back, SIGINT resumes bitwise
def test_sigkill_at_three_steps_and_during_a_checkpoint_write_resumes_bitwise(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data)
    run = tmp_path / "run"
    for i, kill_step in enumerate((2, 5, 7)):  # killed after step k's metrics line
        held = Held(tmp_path, recipe, *(["--resume"] if i else []), gates=[("metrics", kill_step)])
        held.wait_for(_metrics_line(run, kill_step), f"step {kill_step}'s metrics line")
        held.signal(signal.SIGKILL)
        assert held.finish() == -signal.SIGKILL
        assert _steps(run)[-1] == kill_step - 1  # step k's checkpoint was not written yet
        assert not (run / "adapter").exists()

    # killed in the middle of writing step 9's checkpoint: its tensors are on disk, no manifest
    held = Held(tmp_path, recipe, "--resume", gates=[("manifest", 9)])
    partial = run / "checkpoints" / ".tmp-step-9"
    held.wait_for(lambda: (partial / "trainer_state.json").exists(), "step 9's checkpoint write")
    held.signal(signal.SIGKILL)
    assert held.finish() == -signal.SIGKILL
    assert (partial / "trainable.safetensors").is_file() and not (partial / "manifest.json").exists()
    assert _steps(run) == [6, 7, 8]
    assert ckpt.resumable_checkpoint(run) == (run / "checkpoints" / "step-8", [])

    resumed = _cli(tmp_path, "train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-8" in resumed.stdout
    assert not partial.exists()
    _assert_same_adapter(run, reference)


# ---- SIGINT / SIGTERM ----------------------------------------------------------------------------

def test_sigint_saves_at_the_step_boundary_and_resumes_bitwise(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data, save_every=None)
    run = tmp_path / "run"
    held = Held(tmp_path, recipe, gates=[("metrics", 4)])
    held.wait_for(_metrics_line(run, 4), "step 4's metrics line")
    held.signal(signal.SIGINT)  # while step 4 is logged: the run stops after it
    held.release(0)
    assert held.finish() == 130, held.stderr()
    last = held.stderr().strip().splitlines()[-1]
    assert last == (f"interrupted (SIGINT) at step 4; checkpoint saved to {run}/checkpoints/step-4; "
                    f"resume with peftune train {recipe} --resume")
    assert "Traceback" not in held.stderr()
    assert _steps(run) == [4] and ckpt.verify_checkpoint(run / "checkpoints" / "step-4") is None
    assert not (run / "adapter").exists()

    resumed = _cli(tmp_path, "train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(run, reference)


def test_sigterm_then_signals_during_the_save_leave_a_whole_checkpoint(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data, save_every=None)
    run = tmp_path / "run"
    held = Held(tmp_path, recipe, gates=[("metrics", 6), ("manifest", 6)])
    held.wait_for(_metrics_line(run, 6), "step 6's metrics line")
    held.signal(signal.SIGTERM)
    held.release(0)
    partial = run / "checkpoints" / ".tmp-step-6"
    held.wait_for(lambda: (partial / "trainer_state.json").exists(), "the interrupt's checkpoint")
    held.signal(signal.SIGTERM)  # a second and a third signal while the checkpoint is written
    held.signal(signal.SIGINT)
    held.release(1)
    assert held.finish() == 143, held.stderr()
    stderr = held.stderr()
    assert "already stopping" in stderr and "Traceback" not in stderr
    assert "interrupted (SIGTERM) at step 6; checkpoint saved to" in stderr.strip().splitlines()[-1]
    assert _steps(run) == [6] and not partial.exists()
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-6") is None

    resumed = _cli(tmp_path, "train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(run, reference)


def test_sigint_before_training_exits_130_and_writes_nothing(tmp_path, tiny_model_dir, text_data):
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data)
    held = Held(tmp_path, recipe, gates=[("setup", 0)])
    held.wait_for(lambda: Path(f"{held.releases[0]}.held").exists(), "the model load")
    held.signal(signal.SIGINT)
    assert held.finish() == 130  # Typer's exit for Ctrl-C: nothing to resume yet
    assert "Traceback" not in held.stderr()
    assert not (tmp_path / "run").exists()


def test_signals_wait_while_a_checkpoint_is_written_and_ignored_ones_stay_ignored():
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job inherits it
        with train_signals.StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            with train_signals.signals_held():  # the writing thread: a signal to it waits
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                time.sleep(0.05)
                assert not stop()
            assert stop() and stop.signum == signal.SIGTERM  # delivered once it is whole
            with train_signals.signals_held():  # one to the process is only recorded: nothing raises
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


# ---- SIGINT / SIGTERM on two processes ---------------------------------------------------------

@pytest.fixture(scope="module")
def reference_two(tmp_path_factory, tiny_model_dir, text_data) -> dict:
    """The uninterrupted 2-process run (gloo) that the interrupted ones must reproduce."""
    tmp_path = tmp_path_factory.mktemp("reference_two")
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data, save_every=None)
    result = _cli(tmp_path, "train", str(recipe), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    return {"run": run, "adapter": adapter_weights(run)}


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-launcher"])
def test_two_processes_stop_at_one_step_with_one_checkpoint_and_resume_bitwise(
        tmp_path, tiny_model_dir, text_data, reference_two, how):
    """Ctrl-C (SIGINT to the terminal's process group) or a scheduler's SIGTERM to the
    launcher alone: the launcher forwards it (torch elastic starts each process in a session
    of its own, so the terminal's SIGINT reaches the launcher only), both processes agree to
    stop after step 4 (they agree at every step boundary, so a rank that gets the signal late
    still stops there), rank 0 writes one checkpoint and says so once, and `--resume --nproc 2`
    ends bitwise where the straight 2-process run does."""
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data, save_every=None)
    run = tmp_path / "run"
    held = Held(tmp_path, recipe, "--nproc", "2", gates=[("metrics", 4), ("steps", 0)],
                launched=True)
    held.wait_for(_metrics_line(run, 4), "step 4's metrics line")  # both processes held there
    signum = signal.SIGINT if how == "ctrl-c" else signal.SIGTERM
    held.ctrl_c() if how == "ctrl-c" else held.signal(signal.SIGTERM)
    held.wait_for(lambda: "stopping after the current optimizer step" in held.stderr(),
                  "rank 0's notice of the signal")
    held.release(0)
    assert held.finish(timeout=120) == 128 + signum, held.stderr()
    stderr = held.stderr()
    name = signal.Signals(signum).name
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [  # rank 0 only, and nothing from the launcher
        f"{name}: stopping after the current optimizer step and saving a checkpoint",
        f"interrupted ({name}) at step 4; checkpoint saved to {run}/checkpoints/step-4; "
        f"resume with peftune train {recipe} --resume --nproc 2"], stderr
    stopped_at = {rank: Path(f"{held.releases[1]}.rank{rank}").read_text() for rank in (0, 1)}
    assert stopped_at == {0: "4", 1: "4"}  # the same step boundary on both processes
    assert _steps(run) == [4] and ckpt.verify_checkpoint(run / "checkpoints" / "step-4") is None
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "adapter").exists()
    if how != "ctrl-c":  # the same checkpoint at the same step: one resume proves it (~15 s)
        return

    resumed = _cli(tmp_path, "train", str(recipe), "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1
    _assert_same_adapter(run, reference_two)


# ---- SIGINT / SIGTERM after training and outside it ----------------------------------------------

def test_ctrl_c_during_the_export_leaves_no_adapter_and_a_checkpoint_that_resumes(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data, save_every=None)
    run = tmp_path / "run"
    held = Held(tmp_path, recipe, gates=[("export", 0)])
    held.wait_for(lambda: Path(f"{held.releases[0]}.held").exists(), "the adapter's export")
    assert (run / ".tmp-adapter" / "adapter_model.safetensors").is_file()  # half-way there
    held.ctrl_c()
    assert held.finish() == 130, held.stderr()
    lines = held.stderr().strip().splitlines()
    assert lines[-1] == (
        f"interrupted (SIGINT) while writing {run}/adapter after step {STEPS}: nothing was "
        f"written there; the trained weights are in {run}/checkpoints/step-{STEPS}; resume "
        f"with peftune train {recipe} --resume")
    assert "Traceback" not in held.stderr() and sum("interrupted" in x for x in lines) == 1
    assert not (run / "adapter").exists() and not (run / ".tmp-adapter").exists()
    assert not (run / "summary.json").exists()
    # no save_every: the checkpoint was written on the interrupt, so the training is not lost
    assert _steps(run) == [STEPS]
    assert ckpt.verify_checkpoint(run / "checkpoints" / f"step-{STEPS}") is None

    resumed = _cli(tmp_path, "train", str(recipe), "--resume")  # exports without training
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(run, reference)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_eval_writes_nothing_and_exits_128_plus_it(
        tmp_path, text_data, reference, signum):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    held = Held(tmp_path, None, str(run), "--task", "perplexity", "--data",
                str(text_data["val"]), "--compare", "base", "--quiet", verb="eval",
                gates=[("eval-write", 0)])
    held.wait_for(lambda: Path(f"{held.releases[0]}.held").exists(), "eval's output write")
    assert [p.name for p in run.glob(".eval.tmp-*/predictions.jsonl")]  # a temp dir exists
    held.ctrl_c() if signum == signal.SIGINT else held.signal(signum)
    assert held.finish() == 128 + signum, held.stderr()
    lines = [line for line in held.stderr().splitlines() if line.strip()]
    assert lines == [f"interrupted ({signal.Signals(signum).name}): peftune eval stopped; "
                     f"nothing was written to {run / 'eval'}"], held.stderr()
    assert not (run / "eval").exists() and not list(run.glob(".eval.tmp-*"))


def test_ctrl_c_in_merge_and_select_data_says_so_and_leaves_nothing(
        tmp_path, text_data, reference, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from peftune.merge import writer
    from peftune.select import runner as select_runner

    monkeypatch.setattr(writer, "publish", interrupt)  # verified, about to be put in place
    code, _, err = main_in_process(capsys, "merge", str(reference["run"]),
                                   "--out", str(tmp_path / "merged"), "--quiet")
    assert code == 130
    assert err.strip() == (f"interrupted (SIGINT): peftune merge stopped; nothing was written "
                           f"to {tmp_path / 'merged'}")
    assert list(tmp_path.iterdir()) == []  # no merged/, no .tmp-merge-*

    monkeypatch.setattr(select_runner, "publish", interrupt)
    out = tmp_path / "selected"
    code, _, err = main_in_process(capsys, "select-data", "--method", "dsir", "--pool",
                                   str(text_data["train"]), "--target", str(text_data["val"]),
                                   "--k", "5", "--out", str(out), "--quiet")
    assert code == 130
    assert err.strip() == f"interrupted (SIGINT): peftune select-data stopped; nothing was written to {out}"
    assert list(tmp_path.iterdir()) == []


# ---- NaN ---------------------------------------------------------------------------------------

def test_nan_at_step_k_stops_and_the_last_good_checkpoint_resumes_bitwise(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe = _recipe(tmp_path, "run", tiny_model_dir, text_data)
    run = tmp_path / "run"
    held = Held(tmp_path, recipe, gates=[("nan", 6)])
    assert held.finish() == 1
    lines = held.stderr().strip().splitlines()
    assert lines[-1].startswith("error: the loss became nan at step 6;"), held.stderr()
    assert "Traceback" not in held.stderr()
    assert _steps(run) == [3, 4, 5]  # nothing for the bad step
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "adapter").exists()
    assert ckpt.resumable_checkpoint(run) == (run / "checkpoints" / "step-5", [])

    resumed = _cli(tmp_path, "train", str(recipe), "--resume")  # the data was fine after all
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(run, reference)


# ---- checksums -----------------------------------------------------------------------------------

def test_the_manifest_holds_the_size_and_sha256_of_every_file(reference):
    path = reference["run"] / "checkpoints" / f"step-{STEPS}"
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert set(files) >= {"trainable.safetensors", "training_state.pt", "trainer_state.json"}
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _copy_unfinished(reference: dict, tmp_path: Path, tiny_model_dir, text_data) -> tuple[Path, Path]:
    """The reference run as if killed after its last checkpoint (no adapter, no summary)."""
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    return _recipe(tmp_path, "run", tiny_model_dir, text_data), run


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_and_corrupted_checkpoints_fall_back_to_the_previous_one(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe, run = _copy_unfinished(reference, tmp_path, tiny_model_dir, text_data)
    assert _steps(run) == [8, 9, 10]
    (run / "checkpoints" / "step-10" / "trainable.safetensors").unlink()
    with (run / "checkpoints" / "step-10" / "trainable.safetensors").open("wb"):
        pass  # truncated to nothing
    _flip_byte(run / "checkpoints" / "step-9" / "training_state.pt")  # same size, other bytes
    # steps 9 and 10 trained again from step 8: the metrics after step 8 are dropped
    resumed = _cli(tmp_path, "train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, resumed.stderr
    assert "step-10 is unusable: trainable.safetensors is 0 bytes" in warnings[0]
    assert "step-9 is unusable: training_state.pt does not match its sha256" in warnings[1]
    assert f"resuming from {run}/checkpoints/step-8" in resumed.stdout
    _assert_same_adapter(run, reference)


def test_no_valid_checkpoint_exits_2_with_one_line_per_checkpoint(
        tmp_path, tiny_model_dir, text_data, reference):
    recipe, run = _copy_unfinished(reference, tmp_path, tiny_model_dir, text_data)
    for step in (8, 9, 10):
        _flip_byte(run / "checkpoints" / f"step-{step}" / "trainable.safetensors")
    result = _cli(tmp_path, "train", str(recipe), "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line.split("/checkpoints/")[1].split()[0] for line in lines[:3]] == [
        "step-10", "step-9", "step-8"]
    assert lines[-1].startswith("error: --resume: no valid checkpoint in ")
    assert not (run / "adapter").exists()


def test_a_checkpoint_without_manifest_is_used_unverified_with_a_note(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference["run"] / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "step-10" / "manifest.json").unlink()
    path, notes = ckpt.resumable_checkpoint(run)
    assert path == run / "checkpoints" / "step-10"
    assert len(notes) == 1 and "no manifest.json" in notes[0] and "unverified" in notes[0]
    (run / "checkpoints" / "step-10" / "training_state.pt").unlink()  # but a missing file counts
    path, notes = ckpt.resumable_checkpoint(run)
    assert path == run / "checkpoints" / "step-9" and "training_state.pt is missing" in notes[0]


# ---- output location -----------------------------------------------------------------------------

def _mount_prefix(tmp_path: Path, setup: str) -> tuple:
    """Run the command in a private mount namespace after `setup` (root only): a read-only
    bind mount or a full tmpfs that root cannot write through either, unlike chmod."""
    prefix = ("unshare", "-m", "sh", "-c", f"{setup} && exec \"$@\"", "sh")
    if shutil.which("unshare") is None:
        pytest.skip("running as root (chmod does not stop root) and unshare is missing")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"running as root and no private mount namespace: {probe.stderr.strip()}")
    return prefix


def test_read_only_output_location_fails_before_training(tmp_path, tiny_model_dir, text_data):
    parent = tmp_path / "ro"
    parent.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=parent / "run")
    if os.geteuid() == 0:
        prefix = _mount_prefix(tmp_path, f"mount --bind {parent} {parent} && "
                                         f"mount -o remount,bind,ro {parent}")
    else:
        parent.chmod(0o555)
        prefix = ()
    try:
        result = _cli(tmp_path, "train", str(recipe), prefix=prefix)
    finally:
        parent.chmod(0o755)
    assert_one_error_line(result, f"output.dir: cannot write to {parent} (")
    assert list(parent.iterdir()) == []


def test_full_output_disk_fails_before_training(tmp_path, tiny_model_dir, text_data):
    if os.geteuid() != 0:
        pytest.skip("a full filesystem needs a private tmpfs mount (root); "
                    "test_no_free_space_for_the_weights_fails_before_training covers the check")
    disk = tmp_path / "disk"
    disk.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=disk / "run")
    prefix = _mount_prefix(tmp_path, f"mount -t tmpfs -o size=256k tmpfs {disk} && "
                                     f"(cat /dev/zero > {disk}/fill 2>/dev/null; true)")
    assert_one_error_line(_cli(tmp_path, "train", str(recipe), prefix=prefix),
                          f"output.dir: cannot write to {disk} (No space left on device)")
    assert list(disk.iterdir()) == []  # the tmpfs was private to that process


def test_no_free_space_for_the_weights_fails_before_training(
        tmp_path, tiny_model_dir, text_data, monkeypatch):
    from peftune.train.run import run_train

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=text_data["train"], out=tmp_path / "run",
                                      train={"save_every": 1}))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage",
                        lambda path: usage._replace(free=1024))  # 1 KiB left
    with pytest.raises(InputError, match=r"output.dir: .* has 0.0 MiB free; this run writes at"):
        run_train(recipe, quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_failed_checkpoint_write_removes_its_temp_dir_and_keeps_the_previous(
        tmp_path, tiny_model_dir, text_data, monkeypatch):
    from peftune.train.run import run_train

    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_up(obj, path, *args, **kwargs):  # the third checkpoint: half a file, ENOSPC
        calls["n"] += 1
        if calls["n"] < 3:
            return real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", disk_fills_up)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=text_data["train"], out=tmp_path / "run",
                                      train={"max_steps": 6, "save_every": 1,
                                             "keep_checkpoints": 5}))
    with pytest.raises(TrainingError, match=r"could not write checkpoint step-3 .*No space left "
                                            r"on device \(ENOSPC\); nothing half-written"):
        run_train(recipe, quiet=True)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert ckpt.resumable_checkpoint(run) == (run / "checkpoints" / "step-2", [])
    assert not (run / "adapter").exists()
