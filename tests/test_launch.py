"""`peftune train`'s launch (peftune/train/launch.py) and the rules about ranks
(peftune/dist.py): the launched processes run the command as typed less the launch flags;
reading a rank has no side effect; an error every rank finds is printed by rank 0 alone.
Nothing here starts a process group."""

from __future__ import annotations

import sys

import pytest
from conftest import run_python, write_recipe

from peftune import dist
from peftune.errors import InputError
from peftune.train import launch
from peftune.train.interrupts import LAUNCH_FLAGS


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(LAUNCH_FLAGS, "")  # restored after the test (a relaunch sets it)


# ---- the launched command -------------------------------------------------------------------

@pytest.mark.parametrize("argv, child", [
    (["train", "r.yaml", "--nproc", "2"], ["train", "r.yaml"]),
    (["train", "--nproc=2", "r.yaml", "train.lr=1e-4", "--resume"],
     ["train", "r.yaml", "train.lr=1e-4", "--resume"]),
    (["train", "r.yaml", "--accelerate-config", "c.yaml", "adapter.r=8", "--nproc", "4",
      "--overwrite"], ["train", "r.yaml", "adapter.r=8", "--overwrite"]),
    (["train", "--accelerate-config=c.yaml", "r.yaml", "output.dir=runs/--nproc", "--nproc=3"],
     ["train", "r.yaml", "output.dir=runs/--nproc"]),
    (["train", "r.yaml", "--nproc", "2", "--", "--nproc"], ["train", "r.yaml", "--", "--nproc"]),
])
def test_the_launched_command_is_this_one_without_the_launch_flags(argv, child):
    assert launch.child_argv(argv) == child


def test_train_relaunches_the_command_as_typed(tmp_path, tiny_model_dir, text_data,
                                               one_process, monkeypatch, capsys):
    """Through the CLI: the original command line (sys.argv), its order, `=` forms and
    overrides kept, reaches the launcher without --nproc and --accelerate-config."""
    from peftune.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    config = tmp_path / "accelerate.yaml"
    config.write_text("distributed_type: MULTI_CPU\n")
    launched = []

    def relaunch(argv, *, nproc, config):
        launched.append((argv, nproc, config))
        return 0

    monkeypatch.setattr(launch, "relaunch", relaunch)
    monkeypatch.setattr(sys, "argv", [
        "peftune", "train", "--nproc=2", str(recipe), "train.lr=1e-3", "--accelerate-config",
        str(config), "train.max_steps=3", "--overwrite"])
    main()
    assert launched == [(["train", str(recipe), "train.lr=1e-3", "train.max_steps=3",
                          "--overwrite"], 2, config)]
    assert not (tmp_path / "run").exists()


def test_a_failed_launch_is_the_commands_exit_code(tmp_path, tiny_model_dir, text_data,
                                                   one_process, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    monkeypatch.setattr(launch, "relaunch", lambda argv, *, nproc, config: 2)
    code = launch.train_command(recipe, [], resume=False, overwrite=False, nproc="2",
                                accelerate_config=None, argv=["train", str(recipe), "--nproc", "2"])
    assert code == 2


def test_a_launched_process_refuses_the_launch_flags(tmp_path, tiny_model_dir, text_data,
                                                     one_process, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(InputError, match="already started by a launcher"):
        launch.train_command(recipe, [], resume=False, overwrite=False, nproc="2",
                             accelerate_config=None, argv=["train", str(recipe), "--nproc", "2"])


# ---- ranks ----------------------------------------------------------------------------------

def test_reading_the_rank_is_the_environment_only(monkeypatch, one_process):
    assert (dist.world_size(), dist.rank(), dist.local_rank()) == (1, 0, 0)
    assert dist.is_main() and not dist.launched() and dist.rank_prefix() == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (dist.world_size(), dist.rank(), dist.local_rank()) == (2, 1, 1)
    assert not dist.is_main() and dist.launched() and dist.rank_prefix() == "rank 1: "
    monkeypatch.setenv("RANK", "0")
    assert dist.is_main() and dist.rank_prefix() == ""


def test_an_error_every_rank_finds_is_shown_by_rank_0(monkeypatch, one_process):
    assert dist.found_on_every_rank("bad").shown_by_main is False
    monkeypatch.setenv("RANK", "1")
    err = dist.found_on_every_rank("bad")
    assert err.shown_by_main is True and err.lines == ["bad"] and err.from_rank is None


def test_input_error_fields():
    err = InputError("one", "", "two")
    assert err.lines == ["one", "two"] and str(err) == "one\ntwo"
    assert err.shown_by_main is False and err.from_rank is None
    shared = InputError("x", shown_by_main=True, from_rank=1)
    assert shared.shown_by_main and shared.from_rank == 1


def test_one_process_runs_the_collectives_in_place(one_process):
    class One:
        num_processes = 1

    ranks = dist.Ranks()
    assert (ranks.world, ranks.rank) == (1, 0)
    assert ranks.mine([1, 2, 3]) == [1, 2, 3] and ranks.gather("v") == ["v"]
    assert dist.run_on_main(None, lambda: 7, share_result=True) == 7
    assert dist.run_on_main(One(), lambda: 7) == 7
    assert dist.main_first(One(), lambda: 8) == 8 and dist.agree(One(), lambda: 9) == 9
    flag = lambda: True  # noqa: E731
    assert dist.any_rank(One(), flag) is flag


def test_dist_launch_and_interrupts_import_no_torch():
    script = ("import sys\nimport peftune.dist, peftune.interrupts, peftune.train.interrupts, "
              "peftune.train.launch, peftune.compat\n"
              "heavy = {'torch', 'accelerate', 'transformers'} & set(sys.modules)\n"
              "assert not heavy, heavy\n")
    result = run_python(script, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
