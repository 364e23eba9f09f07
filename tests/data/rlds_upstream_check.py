"""RLDS/TFDS files written by the upstream tools, read by the engine (manual check).

Not a pytest module: TensorFlow, tensorflow-datasets and rlds do not belong in the project
venv, so step 1 runs in another environment (docs/lerobot_roundtrip.md, "Other upstream
tools")::

    TF_VENV/bin/python tests/data/rlds_upstream_check.py write OUT_DIR     # rlds EpisodeWriter + a TFDS builder
    .venv/bin/python tests/data/rlds_upstream_check.py read OUT_DIR         # the engine reads both, compares
    .venv/bin/python tests/data/rlds_upstream_check.py ours OUT_DIR         # the engine writes RLDS (write_rlds)
    TF_VENV/bin/python tests/data/rlds_upstream_check.py tfds OUT_DIR      # TFDS reads it, compares

Step 1 also stores, per episode, the arrays TFDS itself reads back (``truth.npz``);
step 2 requires the engine's episodes to equal them exactly.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

N_EPISODES = 5


def _episode_arrays(rng, i):
    T = 3 + i
    return {
        "state": rng.standard_normal((T, 7)).astype(np.float32),
        "embedding": rng.standard_normal((T, 512)).astype(np.float32),
        "rotation": rng.standard_normal((T, 3, 3)).astype(np.float32),
        "image": rng.integers(0, 256, (T, 8, 10, 3), dtype=np.uint8),
        "world_vector": rng.standard_normal((T, 3)).astype(np.float32),
        "gripper": rng.standard_normal((T, 1)).astype(np.float32),
        "reward": np.r_[np.zeros(T - 1), float(i % 2)].astype(np.float32),
        "instruction": "pick the can" if i % 2 else "open the drawer",
    }


def write(out: pathlib.Path) -> None:
    import importlib.util
    import types

    import tensorflow as tf
    import tensorflow_datasets as tfds

    # rlds/__init__ imports reverb (its transformations), which does not install here; the
    # EpisodeWriter does not need it, so the package is entered without running __init__.
    spec = importlib.util.find_spec("rlds")
    pkg = types.ModuleType("rlds")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["rlds"] = pkg
    from rlds.tfds.episode_writer import EpisodeWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    eps = [_episode_arrays(rng, i) for i in range(N_EPISODES)]
    obs_info = tfds.features.FeaturesDict({
        "state": tfds.features.Tensor(shape=(7,), dtype=np.float32),
        "natural_language_embedding": tfds.features.Tensor(shape=(512,), dtype=np.float32),
        "rotation": tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
        "image": tfds.features.Image(shape=(8, 10, 3), encoding_format="png"),
        "natural_language_instruction": tfds.features.Text(),
    })
    action_info = tfds.features.FeaturesDict({
        "world_vector": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "gripper_closedness_action": tfds.features.Tensor(shape=(1,), dtype=np.float32),
    })
    config = tfds.rlds.rlds_base.DatasetConfig(
        name="episode_writer_ds",
        observation_info=obs_info,
        action_info=action_info,
        reward_info=np.float32,
        discount_info=np.float32,
        episode_metadata_info={"episode_id": tfds.features.Text()},
    )

    def steps(e):
        T = len(e["state"])
        return [
            {
                "observation": {"state": e["state"][t], "natural_language_embedding": e["embedding"][t], "rotation": e["rotation"][t],
                                "image": e["image"][t], "natural_language_instruction": e["instruction"]},
                "action": {"world_vector": e["world_vector"][t], "gripper_closedness_action": e["gripper"][t]},
                "reward": e["reward"][t], "discount": np.float32(1.0),
                "is_first": t == 0, "is_last": t == T - 1, "is_terminal": t == T - 1 and bool(e["reward"][-1]),
            }
            for t in range(T)
        ]

    ew_dir = out / "ew" / "episode_writer_ds" / "1.0.0"  # the writer writes into this folder itself
    ew_dir.mkdir(parents=True)
    writer = EpisodeWriter(str(ew_dir), config, max_episodes_per_file=2, version="1.0.0")
    for i, e in enumerate(eps):
        writer.add_episode({"steps": steps(e), "episode_id": f"ep-{i}"})
    writer.close()
    print("EpisodeWriter files:", sorted(p.name for p in (out / "ew" / "episode_writer_ds" / "1.0.0").iterdir()))

    class OxeStyle(tfds.core.GeneratorBasedBuilder):
        """An Open X-Embodiment-style builder (fractal-like features)."""

        VERSION = tfds.core.Version("0.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "steps": tfds.features.Dataset({
                        "observation": obs_info, "action": action_info,
                        "reward": tfds.features.Scalar(dtype=np.float32), "discount": tfds.features.Scalar(dtype=np.float32),
                        "is_first": tfds.features.Scalar(dtype=np.bool_), "is_last": tfds.features.Scalar(dtype=np.bool_),
                        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                    }),
                    "episode_metadata": tfds.features.FeaturesDict({"episode_id": tfds.features.Text(), "file_path": tfds.features.Text()}),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(0, 3)), "val": self._generate_examples(range(3, N_EPISODES))}

        def _generate_examples(self, idx):
            for i in idx:
                yield f"k{i}", {"steps": steps(eps[i]), "episode_metadata": {"episode_id": f"oxe-{i}", "file_path": f"/raw/{i}.npz"}}

    builder = OxeStyle(data_dir=str(out / "tfds"))
    builder.download_and_prepare()
    print("TFDS builder files:", sorted(p.name for p in (out / "tfds" / "oxe_style" / "0.1.0").iterdir()))

    # what TFDS itself reads back, to compare the engine against
    truth = {}
    for tag, b in (("ew", tfds.builder_from_directory(str(out / "ew" / "episode_writer_ds" / "1.0.0"))), ("oxe", builder)):
        for split in b.info.splits:
            for ep in tfds.as_numpy(b.as_dataset(split=split)):
                eid = (ep["episode_id"] if tag == "ew" else ep["episode_metadata"]["episode_id"]).decode()
                st = list(ep["steps"])
                truth[f"{tag}/{eid}/state"] = np.stack([s["observation"]["state"] for s in st])
                truth[f"{tag}/{eid}/rotation"] = np.stack([s["observation"]["rotation"] for s in st])
                truth[f"{tag}/{eid}/embedding"] = np.stack([s["observation"]["natural_language_embedding"] for s in st])
                truth[f"{tag}/{eid}/image"] = np.stack([s["observation"]["image"] for s in st])
                truth[f"{tag}/{eid}/action"] = np.concatenate(
                    [np.stack([s["action"]["gripper_closedness_action"] for s in st]), np.stack([s["action"]["world_vector"] for s in st])], 1
                )
                truth[f"{tag}/{eid}/reward"] = np.stack([s["reward"] for s in st])
                truth[f"{tag}/{eid}/instruction"] = np.array(st[0]["observation"]["natural_language_instruction"].decode())
                truth[f"{tag}/{eid}/split"] = np.array(split)
    np.savez(out / "truth.npz", **truth)
    (out / "versions.json").write_text(json.dumps({"tensorflow": tf.__version__, "tensorflow_datasets": tfds.__version__, "rlds": _version("rlds")}))
    print("versions:", (out / "versions.json").read_text())


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def read(out: pathlib.Path) -> None:
    from cupid_engine.data import open_source

    truth = np.load(out / "truth.npz")
    for tag, path in (("ew", out / "ew" / "episode_writer_ds"), ("oxe", out / "tfds" / "oxe_style")):
        ds = open_source(path)  # builder folders: the newest version is picked
        eps = list(ds.episodes())
        ids = sorted(k.split("/")[1] for k in truth.files if k.startswith(f"{tag}/") and k.endswith("/state"))
        assert sorted(e.episode_id for e in eps) == ids, (tag, [e.episode_id for e in eps], ids)
        assert "steps/observation/natural_language_embedding" in ds.skipped_fields, ds.skipped_fields
        assert "steps/observation/rotation" in ds.skipped_fields, ds.skipped_fields
        full = open_source(path, obs_keys=["state", "rotation", "natural_language_embedding", "image"])
        for e in full.episodes():
            key = f"{tag}/{e.episode_id}"
            np.testing.assert_array_equal(e.observations["state"], truth[f"{key}/state"])
            np.testing.assert_array_equal(e.observations["rotation"], truth[f"{key}/rotation"].reshape(e.length, 9))
            np.testing.assert_array_equal(e.observations["natural_language_embedding"], truth[f"{key}/embedding"])
            np.testing.assert_array_equal(e.image_array("image"), truth[f"{key}/image"])
            np.testing.assert_array_equal(e.actions, truth[f"{key}/action"])
            assert e.return_ == float(truth[f"{key}/reward"].sum()), (e.return_, truth[f"{key}/reward"])
            assert e.task == str(truth[f"{key}/instruction"]), (e.task, truth[f"{key}/instruction"])
            assert e.split == {"train": "train", "val": "holdout"}[str(truth[f"{key}/split"])]
        print(f"{tag}: {ds.path} ({ds.shards()}): {len(eps)} episodes; ids, splits, state, 3x3 rotation, 512-d embedding, "
              f"PNG image, dict action, return and instruction equal TFDS's own reading; skipped by default: {sorted(ds.skipped_fields)}")


def ours(out: pathlib.Path) -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from cupid_engine.data import write_rlds
    from tests.data.helpers import make_episodes

    eps = make_episodes(np.random.default_rng(9), 6)
    for e in eps[:3]:
        e.images = {"wrist": np.random.default_rng(1).integers(0, 256, (e.length, 6, 4, 3), dtype=np.uint8)}
    eps = eps[:3]  # one camera layout for every episode
    root = write_rlds(out / "ours" / "engine_ds" / "1.0.0", eps, name="engine_ds", episodes_per_shard=2, overwrite=True)
    arrays = {}
    for e in eps:
        arrays[f"{e.episode_id}/state"] = e.observations["state"]
        arrays[f"{e.episode_id}/gripper"] = e.observations["gripper"]
        arrays[f"{e.episode_id}/wrist"] = e.images["wrist"]
        arrays[f"{e.episode_id}/action"] = e.actions
        arrays[f"{e.episode_id}/task"] = np.array(e.task)
        arrays[f"{e.episode_id}/split"] = np.array(e.split)
        arrays[f"{e.episode_id}/metadata"] = np.array(json.dumps(e.metadata, sort_keys=True))
    np.savez(out / "ours_truth.npz", **arrays)
    print("wrote", root, sorted(p.name for p in root.iterdir()))


def tfds_side(out: pathlib.Path) -> None:
    import tensorflow_datasets as tfds

    truth = np.load(out / "ours_truth.npz")
    b = tfds.builder_from_directory(str(out / "ours" / "engine_ds" / "1.0.0"))
    seen = []
    for split in b.info.splits:
        for ep in tfds.as_numpy(b.as_dataset(split=split)):
            eid = ep["episode_metadata"]["episode_id"].decode()
            st = list(ep["steps"])
            np.testing.assert_array_equal(np.stack([s["observation"]["state"] for s in st]), truth[f"{eid}/state"])
            np.testing.assert_array_equal(np.stack([s["observation"]["gripper"] for s in st]), truth[f"{eid}/gripper"])
            np.testing.assert_array_equal(np.stack([s["observation"]["wrist"] for s in st]), truth[f"{eid}/wrist"])
            np.testing.assert_array_equal(np.stack([s["action"] for s in st]), truth[f"{eid}/action"])
            assert {s["language_instruction"].decode() for s in st} == {str(truth[f"{eid}/task"])}
            assert {"train": "train", "val": "holdout"}[split] == str(truth[f"{eid}/split"])
            assert ep["episode_metadata"]["metadata"].decode() == str(truth[f"{eid}/metadata"])
            assert st[0]["is_first"] and st[-1]["is_last"]
            seen.append(eid)
    assert sorted(seen) == sorted({k.split("/")[0] for k in truth.files}), seen
    print(f"tfds.builder_from_directory reads the engine's RLDS folder: splits {list(b.info.splits)}, {len(seen)} episodes; "
          "observations, PNG camera frames, actions, instructions, ids and metadata equal")


if __name__ == "__main__":
    step, out = sys.argv[1], pathlib.Path(sys.argv[2])
    {"write": write, "read": read, "ours": ours, "tfds": tfds_side}[step](out)
