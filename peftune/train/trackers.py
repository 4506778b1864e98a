"""The run's metrics where people look at them (`output.report_to`): TensorBoard event files
in `output.dir/tensorboard`, and an MLflow run. `metrics.jsonl` is always written; a tracker
receives the same records (each logged step and each validation) from rank 0.

Names: a training record's keys as `train/KEY` (train/loss, train/lr, train/grad_norm, ...), a
validation's `val_KEY` as `val/KEY` (val/loss, val/ppl, val/reward_accuracy); the step is the
optimizer step. Non-numeric values and the step itself are not logged.

`--resume` continues the same curves with no step twice. TensorBoard: the writer opens with
`purge_step` = the checkpoint's step + 1, so what the stopped run logged after its checkpoint
is dropped by TensorBoard's reader. MLflow: the run's id is kept in `output.dir/mlflow.json`
and the run reopened; a metric is logged only at steps after the last one the run holds
(resume is bitwise, so the steps logged after the checkpoint hold the same losses). A tracker
first switched on at a resume gets the steps up to the checkpoint from metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftune.errors import InputError
from peftune.recipe.schema import Recipe

TENSORBOARD_DIR = "tensorboard"
MLFLOW_FILE = "mlflow.json"  # {tracking_uri, experiment, run_id} of the run's MLflow run


def metric_name(key: str) -> str:
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their tracker names."""
    return {metric_name(key): float(value) for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}


def default_mlflow_uri(out: Path) -> str:
    """A SQLite store beside the run directory, shared by the runs there (runs/mlflow.db):
    `mlflow ui --backend-store-uri` with it shows them side by side."""
    return f"sqlite:///{out.resolve().parent / 'mlflow.db'}"


def mlflow_uri(recipe: Recipe, out: Path) -> str:
    return (recipe.output.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or default_mlflow_uri(out))


class Trackers:
    """Every tracker the recipe asks for (on rank 0; none on the other ranks)."""

    def __init__(self, items: list[Any] | None = None):
        self.items = items or []

    @classmethod
    def open(cls, recipe: Recipe, out: Path, *, resume_step: int | None,
             history: list[dict]) -> Trackers:
        """`history`: metrics.jsonl's records up to the checkpoint a resume starts from."""
        opened = cls()
        for name in recipe.output.report_to:
            kind = TensorBoardTracker if name == "tensorboard" else MlflowTracker
            try:
                opened.items.append(kind(recipe, out, resume_step=resume_step, history=history))
            except BaseException:
                opened.close("FAILED")
                raise
        return opened

    def log(self, record: dict) -> None:
        for tracker in self.items:
            tracker.log(record)

    def close(self, status: str, files: Iterable[Path] = ()) -> None:
        """`status`: FINISHED, KILLED (stopped by a signal, resumable) or FAILED; `files`
        (summary.json, the model card, the plot) go to an MLflow run's artifacts."""
        for tracker in self.items:
            tracker.close(status, [f for f in files if f.is_file()])
        self.items = []

    def describe(self) -> dict:
        """summary.json's `trackers`: where each one wrote."""
        return {tracker.name: tracker.where for tracker in self.items}


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, recipe: Recipe, out: Path, *, resume_step: int | None,
                 history: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = out / TENSORBOARD_DIR
        fresh = not log_dir.is_dir()
        purge = resume_step + 1 if resume_step is not None and not fresh else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        self.where = {"log_dir": str(log_dir), "command": f"tensorboard --logdir {log_dir}"}
        if fresh:  # a new run, or a resume that switched TensorBoard on: the steps so far
            if resume_step is None:
                self.writer.add_text("recipe", _recipe_text(out), 0)
            for record in history:
                self.log(record)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self, status: str, files: list[Path]) -> None:
        self.writer.close()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, recipe: Recipe, out: Path, *, resume_step: int | None,
                 history: list[dict]):
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # its store's set-up lines at INFO (set on import)
            logging.getLogger(name).setLevel(logging.WARNING)

        uri = mlflow_uri(recipe, out)
        experiment = recipe.output.mlflow_experiment
        self.client = MlflowClient(tracking_uri=uri)
        saved_path = out / MLFLOW_FILE
        saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
        try:
            if resume_step is not None and saved.get("tracking_uri") == uri:
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                self.last_step = self._last_steps()
            else:
                self.run_id = self._new_run(uri, experiment, recipe, out)
                self.last_step = {}
                saved_path.write_text(json.dumps(
                    {"tracking_uri": uri, "experiment": experiment, "run_id": self.run_id},
                    indent=2) + "\n")
                for record in history:  # a resume that switched MLflow on: the steps so far
                    self.log(record)
        except Exception as err:  # an unreachable server, a store it cannot open
            raise InputError(f"output.report_to: mlflow: cannot log to {uri}: "
                             f"{str(err).splitlines()[0][:300]}; check "
                             "output.mlflow_tracking_uri (or MLFLOW_TRACKING_URI)") from None
        self.where = {"tracking_uri": uri, "experiment": experiment, "run_id": self.run_id,
                      "command": f"mlflow ui --backend-store-uri {uri}"}

    def _new_run(self, uri: str, experiment: str, recipe: Recipe, out: Path) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:  # a SQLite store keeps artifacts beside it (MLflow's default: ./mlruns)
            artifacts = None
            if uri.startswith("sqlite:///"):
                database = Path(uri.removeprefix("sqlite:///")).resolve()
                artifacts = (database.parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        run = self.client.create_run(experiment_id, run_name=out.name,
                                     tags={"peftune.output_dir": str(out.resolve())})
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in _flat(recipe.model_dump())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        if (out / "recipe.yaml").is_file():
            self.client.log_artifact(run.info.run_id, str(out / "recipe.yaml"))
        return run.info.run_id

    def _last_steps(self) -> dict[str, int]:
        """The last step of each metric the run holds."""
        run = self.client.get_run(self.run_id)
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in run.data.metrics}

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = record["step"], int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars(record).items()
                   if step > self.last_step.get(name, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """The resolved recipe as (dotted key, value) pairs; lists as one value."""
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flat(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _recipe_text(out: Path) -> str:
    path = out / "recipe.yaml"
    if not path.is_file():
        return ""
    return "".join(f"    {line}\n" for line in path.read_text().splitlines())  # markdown code
