"""Object stores (issue 17): featurise -> score (every store scorer) -> query against an S3
server on loopback (moto, started here and stopped after) gives the local results;
``--storage-options`` reaches the CLI, the scorers and Ray workers; chunks and markers are
read once per scoring call; the query index of a remote run is cached locally by content.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

BUCKET = "cupid-s3-test"


def _moto_server_command(tmp_root) -> list[str]:
    """``moto_server`` of this venv (the ``dev`` extra), else one in a venv of its own."""
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if os.path.exists(exe):
        return [exe]
    venv = os.path.join(tmp_root, "moto-venv")
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=120)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "moto[server]==5.2.0"], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"moto[server] is not installed here and could not be installed into a venv: {exc}")
    return [os.path.join(venv, "bin", "moto_server")]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the storage options that reach it."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'cupid_engine[s3]')")
    import fsspec.config
    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = _moto_server_command(str(tmp_path_factory.mktemp("moto")))
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.2)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield {"endpoint": endpoint, "options": options}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        fsspec.config.conf.pop("s3", None)
        os.environ.pop("FSSPEC_S3", None)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """The same featurisation into a local store and into ``s3://``."""
    from cupid_engine.featurize import FeaturizeConfig, SyntheticSource, featurize
    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig, save_policy
    from cupid_engine.store.options import apply_storage_options

    root = tmp_path_factory.mktemp("s3stores")
    torch.manual_seed(0)
    ckpt = str(save_policy(MLPPolicy(MLPPolicyConfig.tiny(obs_dim=6, action_dim=2)), root / "policy"))
    cfg = FeaturizeConfig.for_method(k=64, shard_size=8, dtype="float16", batch_size=64)

    def source():
        return SyntheticSource(48, steps=(5, 12), obs_dim=6, action_dim=2, episodes_per_unit=16,
                               holdout_every=4, rollout_every=5)

    remote = f"s3://{BUCKET}/store.zarr"
    apply_storage_options(s3["options"], remote)
    featurize(source(), remote, "r", policy=ckpt, config=cfg, progress=False)
    featurize(source(), str(root / "local.zarr"), "r", policy=ckpt, config=cfg, progress=False)
    return {"remote": remote, "local": str(root / "local.zarr"), "root": root, "policy": ckpt, "config": cfg,
            "source": source}


def _arrays(url):
    from cupid_engine.store import open_store

    run = open_store(url).run("r")
    steps = np.concatenate([run.step_features(e) for e in run.store.episode_ids()])
    return steps, run.episode_features(), run.gram()


def test_featurised_store_on_s3_equals_local(stores):
    for a, b in zip(_arrays(stores["remote"]), _arrays(stores["local"])):
        assert np.array_equal(a, b)


SCORERS = [("cupid", {}), ("cupid-quality", {}), ("cupid-step", {}), ("qoq", {"validation": "failed-rollouts"}),
           ("tracin", {"target": "holdout"}), ("trak-traj", {"target": "holdout"})]


@pytest.mark.parametrize("method,options", SCORERS, ids=[m for m, _ in SCORERS])
def test_every_store_scorer_on_s3_equals_local(stores, method, options):
    from cupid_engine.scorers import score

    remote = score(method, store=stores["remote"], run="r", **options)
    local = score(method, store=stores["local"], run="r", **options)
    assert remote.column("episode_id").to_pylist() == local.column("episode_id").to_pylist()
    assert np.array_equal(remote.column("score").to_numpy(), local.column("score").to_numpy())


def test_each_chunk_and_marker_read_once_per_call(stores, monkeypatch):
    from cupid_engine.scorers.quality import CupidQualityScorer
    from cupid_engine.scorers._cache import CachedStore
    from cupid_engine.store import open_store

    store = open_store(stores["remote"])
    run = store.run("r")
    marker_reads = []
    real_flags = type(run)._done_flags
    monkeypatch.setattr(type(run), "_done_flags", lambda self: marker_reads.append(1) or real_flags(self))
    wrapped = CachedStore(store)
    CupidQualityScorer().score(wrapped, "r")
    steps = run._array("steps")
    n_chunks = -(-int(steps.shape[0]) // int(steps.chunks[0]))
    episodes = run._array("episodes")
    n_episode_chunks = -(-int(episodes.shape[0]) // int(episodes.chunks[0]))
    cached_run = wrapped.run("r")
    assert cached_run.fetches <= n_chunks + n_episode_chunks  # never a chunk twice
    assert len(marker_reads) == 1


def test_cli_score_and_query_with_storage_options(stores, s3, tmp_path, monkeypatch, capsys):
    import fsspec.config
    import s3fs

    from cupid_engine.cli import main

    monkeypatch.setenv("CUPID_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    # Forget the options the fixtures registered: the CLI flag alone must carry them.
    fsspec.config.conf.pop("s3", None)
    os.environ.pop("FSSPEC_S3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    opts = json.dumps(s3["options"])
    for where, extra in ((stores["remote"], ["--storage-options", opts]), (stores["local"], [])):
        out = tmp_path / f"{'s3' if extra else 'local'}.parquet"
        assert main(["score", "cupid-quality", "--store", where, "--run", "r", "--out", str(out), *extra]) == 0
    import pyarrow.parquet as pq

    a, b = pq.read_table(tmp_path / "s3.parquet"), pq.read_table(tmp_path / "local.parquet")
    assert np.array_equal(a.column("score").to_numpy(), b.column("score").to_numpy())

    from cupid_engine.store import open_store

    rollout = next(r["episode_id"] for r in open_store(stores["local"]).catalog().to_pylist()
                   if r["split"] == "rollout")
    answers = []
    for where, extra in ((stores["remote"], ["--storage-options", opts]), (stores["local"], []),
                         (stores["remote"], ["--storage-options", opts])):
        capsys.readouterr()
        assert main(["query", "--store", where, "--run", "r", "--episode", rollout, "--top", "5", "--json",
                     *extra]) == 0
        answers.append(json.loads(capsys.readouterr().out)["results"])
    assert answers[0] == answers[1] == answers[2]
    saved = list((tmp_path / "cache" / "remote").glob("*/index/*/flat.json"))
    assert len(saved) == 1, saved  # the remote run's index, cached locally by content


@pytest.mark.ray
def test_ray_workers_get_storage_options(stores, s3):
    """Workers open the s3:// store with options given only to the driver (no AWS_* env)."""
    from cupid_engine.distributed import RayExecutor
    from cupid_engine.featurize import featurize
    from cupid_engine.store import open_store
    from cupid_engine.store.options import apply_storage_options

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        os.environ.pop(key)
    url = f"s3://{BUCKET}/ray.zarr"
    apply_storage_options(s3["options"], url)
    featurize(stores["source"](), url, "r", policy=stores["policy"], config=stores["config"], progress=False,
              executor=RayExecutor(2))
    assert open_store(url).run("r").is_complete()
    for a, b in zip(_arrays(url), _arrays(stores["local"])):
        assert np.array_equal(a, b)
    shutil.rmtree(stores["root"] / "unused", ignore_errors=True)
