"""`output.report_to`: TensorBoard event files and an MLflow run beside metrics.jsonl, the
curves continued on --resume with no step twice, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import read_metrics, recipe_refusal, write_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from peftune.recipe import load_recipe
from peftune.train.run import run_train


def _tensorboard(run: Path, name: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(name)]


def _mlflow(run: Path, name: str) -> list[tuple[int, float]]:
    import json

    from mlflow.tracking import MlflowClient

    saved = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(saved["run_id"], name))


def _status(run: Path) -> str:
    import json

    from mlflow.tracking import MlflowClient

    saved = json.loads((run / "mlflow.json").read_text())
    return MlflowClient(tracking_uri=saved["tracking_uri"]).get_run(saved["run_id"]).info.status


def test_both_trackers_get_the_curves_and_a_resume_continues_them_without_repeats(
        tmp_path, tiny_model_dir, text_data, monkeypatch):
    """Run a trains 8 steps straight. Run b trains 6 (a checkpoint at 4), loses its adapter
    as if killed after logging step 6, and resumes to 8 from step 4: its TensorBoard and
    MLflow curves hold each step once, with run a's losses."""
    keys = dict(val=text_data["val"], train={"max_steps": 8, "save_every": 4, "log_every": 2,
                                             "eval_every": 4, "keep_checkpoints": 3})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    runs = {}
    for name, steps in (("a", 8), ("b", 6)):
        recipe = write_recipe(tmp_path / f"{name}.yaml", model=tiny_model_dir,
                              data=text_data["train"], out=tmp_path / name, **keys,
                              output={"report_to": ["tensorboard", "mlflow"],
                                      "mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
        summary = run_train(load_recipe(recipe, [f"train.max_steps={steps}"]), quiet=True)
        runs[name] = recipe
    a, b = tmp_path / "a", tmp_path / "b"
    assert summary["trackers"]["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert _status(b) == "FINISHED"
    assert [step for step, _ in _mlflow(b, "train/loss")] == [2, 4, 6]
    # the artifacts beside the SQLite store, not in the current directory (MLflow's ./mlruns)
    assert not list((tmp_path / "cwd").iterdir())
    assert {p.name for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()} >= {
        "recipe.yaml", "summary.json", "README.md", "loss.png"}
    shutil.rmtree(b / "adapter")
    run_train(load_recipe(runs["b"]), resume=True, quiet=True)

    straight = [(r["step"], r["loss"]) for r in read_metrics(a) if "loss" in r]
    assert [step for step, _ in straight] == [2, 4, 6, 8]
    for run in (a, b):
        for read in (_tensorboard, _mlflow):
            logged = read(run, "train/loss")
            assert [step for step, _ in logged] == [2, 4, 6, 8], (run, read)
            assert [v for _, v in logged] == pytest.approx([v for _, v in straight], rel=1e-6)
        assert [step for step, _ in _tensorboard(run, "val/loss")] == [0, 4, 8]
        assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/ppl"} <= set(
            EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"])
    # MLflow keeps what the killed run logged (val/loss at its last step, 6) once
    assert [step for step, _ in _mlflow(b, "val/loss")] == [0, 4, 6, 8]
    assert _status(b) == "FINISHED"


def test_a_tracker_switched_on_at_resume_gets_the_steps_so_far(tmp_path, tiny_model_dir,
                                                               text_data):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", train={"max_steps": 4, "save_every": 2,
                                                       "log_every": 1})
    run_train(load_recipe(recipe), quiet=True)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "adapter")
    run_train(load_recipe(recipe, ["output.report_to=[tensorboard]"]), resume=True, quiet=True)
    assert [step for step, _ in _tensorboard(run, "train/loss")] == [1, 2, 3, 4]


def test_report_to_refusals(tmp_path, tiny_model_dir, text_data, monkeypatch):
    common = dict(model=tiny_model_dir, data=text_data["train"])
    line = recipe_refusal(tmp_path, **common,
                          output={"report_to": ["mlflow"], "mlflow_experiment": ""})
    assert "output.mlflow_experiment" in line
    line = recipe_refusal(tmp_path, **common, output={"mlflow_tracking_uri": "sqlite:///x.db"})
    assert "output.mlflow_tracking_uri" in line and "report_to: [mlflow]" in line
    line = recipe_refusal(tmp_path, **common, output={"report_to": ["wandb"]})
    assert "output.report_to" in line and "tensorboard" in line
    line = recipe_refusal(tmp_path, **common, output={"report_to": ["tensorboard", "tensorboard"]})
    assert "listed 2 times" in line
    import peftune.recipe.extras as extras

    monkeypatch.setattr(extras, "installed", lambda module: module != "mlflow")
    line = recipe_refusal(tmp_path, **common, output={"report_to": "mlflow"})
    assert line.startswith("r.yaml") or "output.report_to" in line
    assert "pip install 'peftune[mlflow]'" in line
