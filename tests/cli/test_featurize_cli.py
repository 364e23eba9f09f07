"""``cupid-engine featurize`` picks its default output per policy class and says so."""

from __future__ import annotations

from cupid_engine.cli import main
from cupid_engine.store import open_store


def test_mlp_defaults_to_energy_and_says_why(loop, tmp_path, capsys):
    assert open_store(loop["store"]).run("base").config.featurizer["output"] == "energy"
    store = str(tmp_path / "s.zarr")
    assert main(["featurize", "--policy", loop["policy"], "--data", loop["data"], "--store", store, "--run", "r",
                 "--k", "8", "--split", "rollout", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "output 'energy' (default for MLPPolicy" in err and "'loss' gradient vanishes" in err
    # An explicit --output is taken as given, without the note.
    assert main(["featurize", "--policy", loop["policy"], "--data", loop["data"], "--store", store, "--run", "r2",
                 "--k", "8", "--split", "rollout", "--output", "loss", "--no-progress"]) == 0
    assert "default for" not in capsys.readouterr().err
    assert open_store(store).run("r2").config.featurizer["output"] == "loss"


def test_diffusion_defaults_to_square(loop, tmp_path, capsys):
    policy = str(tmp_path / "diff")
    assert main(["train", "--data", loop["data"], "--policy", "diffusion", "--size", "tiny", "--out", policy,
                 "--steps", "2", "--batch-size", "32", "--no-progress"]) == 0
    capsys.readouterr()
    store = str(tmp_path / "s.zarr")
    assert main(["featurize", "--policy", policy, "--data", loop["data"], "--store", store, "--run", "d",
                 "--k", "8", "--draws", "2", "--split", "rollout", "--no-progress"]) == 0
    assert "output 'square' (default for DiffusionPolicy" in capsys.readouterr().err
    assert open_store(store).run("d").config.featurizer["output"] == "square"
