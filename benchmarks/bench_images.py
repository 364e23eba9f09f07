"""Peak memory of streaming an image dataset, at two dataset sizes (issue 14, item 1).

For each format the engine writes (LeRobot with PNG frames, LeRobot with MP4 video, RLDS
with PNG images, robomimic HDF5, diffusion_policy zarr), datasets of N and 10·N synthetic
episodes (two 84x84 RGB cameras, T steps each) are written, then read back in a fresh
child process that decodes every frame of every camera and runs a small torch Conv2d
encoder forward over each episode's frames (what an image policy's featuriser does per
batch), keeping nothing. The child reports its peak RSS (``VmHWM``) after imports and at
the end: bounded memory means the end-of-run peak does not grow with the episode count.

Usage::

    .venv/bin/python benchmarks/bench_images.py --episodes 20,200 --steps 20 --out /tmp/bench_images
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

FORMATS = ("lerobot-png", "lerobot-video", "rlds", "robomimic", "replay")


def _episodes(n: int, steps: int, size: int, seed: int):
    from cupid_engine.data import Episode

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        t = np.arange(steps, dtype=np.float32)[:, None, None]
        base = 128 + 100 * np.sin(0.1 * x[None] + 0.3 * t + i)
        agent = np.stack([base, 255 - base, np.broadcast_to(0.5 * base + 40, base.shape)], -1)
        wrist = agent[:, ::-1] * 0.8 + rng.integers(0, 30, agent.shape)
        yield Episode(
            episode_id=f"ep_{i:06d}",
            observations={"state": rng.standard_normal((steps, 9)).astype(np.float32)},
            actions=rng.standard_normal((steps, 7)).astype(np.float32),
            task="lift the red cube",
            images={"agentview": np.clip(agent, 0, 255).astype(np.uint8), "wrist": np.clip(wrist, 0, 255).astype(np.uint8)},
        )


def write(fmt: str, path: pathlib.Path, n: int, steps: int, size: int, per_file: int) -> float:
    from cupid_engine.data import write_dataset, write_replay_buffer, write_rlds, write_robomimic

    eps = _episodes(n, steps, size, seed=0)
    t0 = time.perf_counter()
    if fmt == "lerobot-png":
        write_dataset(path, eps, episodes_per_file=per_file)
    elif fmt == "lerobot-video":
        write_dataset(path, eps, episodes_per_file=per_file, image_format="video")
    elif fmt == "rlds":
        write_rlds(path, eps, episodes_per_shard=per_file)
    elif fmt == "robomimic":
        write_robomimic(path, eps)
    elif fmt == "replay":
        write_replay_buffer(path, eps)
    return time.perf_counter() - t0


def read_child(path: str) -> dict:
    """Run in a fresh process: stream, decode and encode every frame; report VmHWM."""
    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from _common import proc_status_kb

    from cupid_engine.data import open_source

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )
    src = open_source(path)
    base = proc_status_kb("VmHWM")
    n_eps = n_frames = 0
    checksum = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for ep in src.episodes():
            for key in src.image_keys:
                frames = torch.from_numpy(ep.image_array(key)).permute(0, 3, 1, 2).float().div_(255)
                checksum += float(encoder(frames).sum())
                n_frames += frames.shape[0]
            n_eps += 1
    return {
        "episodes": n_eps, "frames": n_frames, "seconds": time.perf_counter() - t0,
        "rss_after_open_mib": base / 1024, "peak_rss_mib": proc_status_kb("VmHWM") / 1024, "checksum": checksum,
    }


def featurize_child(path: str, policy: str, store: str, shard_size: int) -> dict:
    """Run in a fresh process: featurise the dataset with an image policy; report VmHWM."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from _common import proc_status_kb

    from cupid_engine.data import open_source
    from cupid_engine.featurize import FeaturizeConfig, featurize

    cfg = FeaturizeConfig.for_method("tensorsketch", k=256, output="square", draws=2, batch_size=64, shard_size=shard_size)
    src = open_source(path)
    base = proc_status_kb("VmHWM")
    t0 = time.perf_counter()
    run = featurize(src, store, "bench", policy=policy, config=cfg, progress=False)
    info = run.info()
    return {
        "episodes": len(src), "seconds": time.perf_counter() - t0, "shards": info["shards_done"],
        "rss_after_open_mib": base / 1024, "peak_rss_mib": proc_status_kb("VmHWM") / 1024,
    }


def psnr_report(path: str, out: pathlib.Path) -> list[dict]:
    """Video and JPEG fidelity on a dataset's frames: re-encode, decode, PSNR per frame."""
    import io

    from PIL import Image

    from cupid_engine.data import open_source, write_dataset
    from cupid_engine.data.episode import decode_image

    src = open_source(path)
    episodes = list(src.episodes())
    rows = []
    for codec in ("libx264", "libsvtav1"):
        target = out / f"psnr-{codec}"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        write_dataset(target, episodes, image_format="video", video_codec=codec)
        wrote = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (target / "videos").rglob("*.mp4"))
        for key in src.image_keys:
            values = []
            for a, b in zip(episodes, open_source(target).episodes()):
                x, y = a.image_array(key).astype(np.float64), b.image_array(key).astype(np.float64)
                mse = ((x - y) ** 2).reshape(len(x), -1).mean(1)
                values.extend((10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))).tolist())
            rows.append({"encoding": f"video {codec} crf 18 yuv420p", "camera": key, "min_db": min(values),
                         "mean_db": float(np.mean(values)), "frames": len(values), "video_mib": disk / 2**20,
                         "write_s": wrote})
    for key in src.image_keys:
        values = []
        for a in episodes:
            for frame in a.image_array(key):
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=95)
                y = decode_image(buf.getvalue()).astype(np.float64)
                mse = float(((frame.astype(np.float64) - y) ** 2).mean())
                values.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
        rows.append({"encoding": "JPEG quality 95 (Pillow)", "camera": key, "min_db": min(values),
                     "mean_db": float(np.mean(values)), "frames": len(values)})
    for r in rows:
        print(json.dumps(r))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", default="20,200", help="two comma-separated sizes, >= 10x apart")
    ap.add_argument("--steps", type=int, default=20, help="steps per episode")
    ap.add_argument("--size", type=int, default=84, help="image height and width")
    ap.add_argument("--per-file", type=int, default=10,
                    help="episodes per LeRobot data file / RLDS shard (the reader holds one file at a time)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--out", default="/tmp/bench_images")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--featurize", action="store_true",
                    help="also featurise each dataset with a tiny diffusion-image policy (store shards of --per-file episodes)")
    ap.add_argument("--psnr", default=None, metavar="DATASET",
                    help="instead: PSNR of video (libx264, libsvtav1) and JPEG re-encodings of this image dataset's frames")
    ap.add_argument("--read", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.psnr:
        psnr_report(args.psnr, pathlib.Path(args.out))
        return
    if args.read and args.policy:
        print(json.dumps(featurize_child(args.read, args.policy, args.store, args.per_file)))
        return
    if args.read:
        print(json.dumps(read_child(args.read)))
        return
    sizes = [int(s) for s in args.episodes.split(",")]
    out = pathlib.Path(args.out)
    rows = []
    for fmt in args.formats.split(","):
        for n in sizes:
            path = out / f"{fmt}-{n}" if fmt != "robomimic" else out / f"{fmt}-{n}.hdf5"
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            wrote = write(fmt, path, n, args.steps, args.size, args.per_file)
            disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
            child = subprocess.run(
                [sys.executable, __file__, "--read", str(path)], capture_output=True, text=True, check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            res = json.loads(child.stdout.strip().splitlines()[-1])
            res.update(format=fmt, n=n, write_s=wrote, disk_mib=disk / 2**20, load=os.getloadavg()[0])
            if args.featurize:
                policy = out / "policy"
                if not policy.exists():
                    # Any image dataset of the same cameras will do: train 1 step on this one.
                    subprocess.run(
                        [sys.executable, "-m", "cupid_engine", "train", "--data", str(out / f"lerobot-png-{sizes[0]}"
                         if (out / f"lerobot-png-{sizes[0]}").exists() else path), "--policy", "diffusion-image",
                         "--size", "tiny", "--steps", "1", "--out", str(policy), "--no-progress"],
                        check=True, capture_output=True,
                    )
                store = out / f"store-{fmt}-{n}"
                shutil.rmtree(store, ignore_errors=True)
                feat = subprocess.run(
                    [sys.executable, __file__, "--read", str(path), "--policy", str(policy), "--store", str(store),
                     "--per-file", str(args.per_file)],
                    capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                fres = json.loads(feat.stdout.strip().splitlines()[-1])
                res.update(featurize_s=fres["seconds"], featurize_peak_rss_mib=fres["peak_rss_mib"],
                           featurize_rss_after_open_mib=fres["rss_after_open_mib"])
            rows.append(res)
            print(
                f"{fmt:14s} {n:5d} episodes {res['frames']:7d} frames  disk {res['disk_mib']:7.1f} MiB  "
                f"write {wrote:6.1f} s  read+conv {res['seconds']:6.1f} s  "
                f"RSS after open {res['rss_after_open_mib']:6.0f} MiB  peak {res['peak_rss_mib']:6.0f} MiB  "
                + (f"  featurize {res['featurize_s']:6.1f} s peak {res['featurize_peak_rss_mib']:6.0f} MiB"
                   if args.featurize else "")
                + f"  (load {res['load']:.1f})",
                flush=True,
            )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
