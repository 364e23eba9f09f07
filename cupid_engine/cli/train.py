"""``cupid-engine train``: train an MLP, diffusion, image-diffusion or transformer policy on a dataset
(LeRobot, robomimic HDF5, RLDS/TFDS, diffusion_policy replay buffer: whatever ``open_source`` reads).

A curated subset is one flag away: ``--keep curated.parquet`` (a score table from
``cupid-engine curate``, or a text file of episode ids) trains on exactly those episodes,
``--exclude removed.txt`` on the split without them, ``--episodes id1,id2`` on a list.
Subsets train for a *fixed optimiser-step budget* by default, the steps the whole
training split would get at the default epoch count, so a 60-demo subset gets as many
updates as the 180-demo set it came from (``--epochs`` trains by epochs instead).

Owns only argument parsing and printing; the work is done by
:func:`cupid_engine.policies.training.train_policy` and
:func:`cupid_engine.policies.checkpoint.save_policy`, imported inside the handler so that
``cupid-engine --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from cupid_engine.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "train",
        help="train a policy (mlp, diffusion, diffusion-image, transformer) by behaviour cloning",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="PATH",
                   help="dataset path or URL (LeRobot, robomimic, RLDS, replay buffer; format detected)")
    p.add_argument("--policy", required=True, choices=("mlp", "diffusion", "diffusion-image", "transformer"),
                   help="policy kind (diffusion-image and transformer read the dataset's cameras; the transformer "
                        "also the task text)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--split", default=None,
                   help="train on episodes of this split ('all': every split; default 'train', or every split "
                        "when --keep/--episodes name the episodes)")
    p.add_argument("--keep", default=None, metavar="FILE",
                   help="train only on these episodes: a score table (.parquet, e.g. from `curate`) or ids, one a line")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="leave these episodes out: a score table (.parquet) or ids, one a line")
    p.add_argument("--episodes", default=None, metavar="ID1,ID2",
                   help="train only on these comma-separated episode ids (or @FILE)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="per-episode loss weights: a table (.parquet or .csv) with 'episode_id' and a weight column; "
                        "weight 0 drops an episode (trains at the fixed step budget like a subset)")
    p.add_argument("--weight-column", default="weight", help="column of --weights holding the weights")
    p.add_argument("--obs-keys", default=None, metavar="K1,K2",
                   help="observation and camera keys to read (default: all, sorted); unknown keys are refused by name")
    p.add_argument("--version", default=None, metavar="X.Y.Z",
                   help="version folder to read when --data is a TFDS builder folder (default: the newest)")
    p.add_argument("--size", default="default", choices=("tiny", "default", "large"),
                   help="model size preset (large: ~8.5M-param MLP; diffusion has tiny/default only)")
    p.add_argument("--encoder-weights", default=None, metavar="FILE[:PREFIX]",
                   help="diffusion-image: initialise every camera encoder from a local safetensors file (tensors "
                        "under PREFIX, e.g. model.safetensors:encoders.0. of another policy); default random init")
    p.add_argument("--head", default=None, choices=("deterministic", "gaussian"), help="MLP action head")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default: TrainConfig's; on a subset this trains by epochs, not the fixed step budget)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (overrides --epochs; default on a subset: the full training split's "
                        "steps at the default epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: TrainConfig's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: TrainConfig's)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the weights (off by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and noise")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also save the weights every N optimizer steps under OUT/checkpoints/step-NNNNNN (for "
                        "checkpoint ensembles: featurize each into its own run, then score with "
                        "--set checkpoints=run1,run2,...); the run itself is unchanged")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from cupid_engine.data.sources import open_source
    from cupid_engine.policies.checkpoint import CONFIG_FILE, compute_policy_hash, save_policy
    from cupid_engine.policies.diffusion import DiffusionPolicyConfig
    from cupid_engine.policies.mlp import MLPPolicyConfig
    from cupid_engine.policies.training import TrainConfig, train_policy

    obs_keys = tuple(k.strip() for k in args.obs_keys.split(",") if k.strip()) if args.obs_keys else None
    # The reader selects the keys: an unknown one is refused naming it and listing the
    # dataset's low-dimensional and camera keys (UnknownKeyError, a one-line user error).
    dataset = open_source(args.data, version=args.version, **({"obs_keys": obs_keys} if obs_keys else {}))
    fields: dict = {"obs_keys": tuple(dataset.obs_keys)}
    if args.policy == "mlp":
        if args.head:
            fields["head"] = args.head
        maker = {"tiny": MLPPolicyConfig.tiny, "default": MLPPolicyConfig, "large": MLPPolicyConfig.large}[args.size]
    elif args.policy in ("diffusion-image", "transformer"):
        from cupid_engine.policies.diffusion_image import DiffusionImagePolicyConfig
        from cupid_engine.policies.transformer import TransformerPolicyConfig

        if args.head or args.size == "large":
            raise ConfigError(f"--head and --size large apply to --policy mlp only, not {args.policy}")
        if not dataset.image_keys:
            raise ConfigError(f"--policy {args.policy} needs camera images; the dataset has none", where=args.data,
                              hint="train --policy mlp or diffusion on its low-dimensional keys")
        fields["image_keys"] = tuple(dataset.image_keys)
        cls = DiffusionImagePolicyConfig if args.policy == "diffusion-image" else TransformerPolicyConfig
        maker = cls.tiny if args.size == "tiny" else cls
    else:
        if args.head:
            raise ConfigError("--head applies to --policy mlp only")
        if args.size == "large":
            raise ConfigError("--size large exists for --policy mlp only")
        maker = DiffusionPolicyConfig.tiny if args.size == "tiny" else DiffusionPolicyConfig
    policy_config = maker(**fields)

    overrides = {
        "epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "ema_decay": args.ema_decay,
    }
    train_config = TrainConfig(
        seed=args.seed, device=args.device, **{k: v for k, v in overrides.items() if v is not None}
    )
    selection = select_episodes(dataset.catalog(), args.data, split=args.split, keep=args.keep,
                                exclude=args.exclude, episodes=args.episodes)
    weights = None
    if args.weights:
        weights = read_weights(args.weights, args.weight_column, selection.ids)
        selection.subset = True
        selection.how += f", weighted by {args.weights}:{args.weight_column}"
    budget_note, budget = None, "steps" if args.steps is not None else "epochs"
    if selection.subset and args.steps is None and args.epochs is None:
        budget = "fixed"
        steps = step_budget(selection.reference_samples, train_config)
        train_config = train_config.replace(steps=steps)
        budget_note = (f"fixed step budget: {steps} optimizer steps, what the {selection.reference_episodes} "
                       f"'train' episodes ({selection.reference_samples} samples) get at {train_config.epochs} "
                       f"epochs of batch {train_config.batch_size}; pass --epochs to train by epochs instead")
    elif selection.subset and args.steps is None:
        budget_note = (f"trained by epochs on a subset: {len(selection.ids)} of {selection.reference_episodes} "
                       "episodes get proportionally fewer optimizer steps (omit --epochs for a fixed step budget)")
    if selection.subset:
        print(f"train: {selection.describe()}" + (f"; {budget_note}" if budget_note else ""), file=sys.stderr)
    episodes = list(dataset.episodes(ids=selection.ids))
    init = None
    if args.encoder_weights:
        if args.policy != "diffusion-image":
            raise ConfigError(f"--encoder-weights applies to --policy diffusion-image, not {args.policy}")
        file, _, prefix = args.encoder_weights.partition(":")
        if not os.path.isfile(file):
            raise ConfigError(f"--encoder-weights {file!r} is not a local file", hint="give a .safetensors file")

        def init(policy) -> None:
            try:
                policy.load_encoder_weights(file, prefix=prefix)
            except ValueError as exc:
                raise ConfigError(f"--encoder-weights: {exc}",
                                  hint="PREFIX must select one ImageEncoder's tensors, e.g. encoders.0.") from None

    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if os.path.exists(os.path.join(args.out, CONFIG_FILE)) and not args.overwrite:
        # Refused before training rather than after it.
        raise ConfigError(f"{args.out} already holds a checkpoint", hint="pass --overwrite or another --out")
    saved: list[str] = []

    def on_checkpoint(step: int, snapshot) -> None:
        where = os.path.join(args.out, "checkpoints", f"step-{step:06d}")
        saved.append(str(save_policy(snapshot, where, overwrite=args.overwrite)))

    policy = train_policy(policy_config, episodes, train_config, cluster_weights=weights,
                          progress=not args.no_progress, init=init, checkpoint_every=args.checkpoint_every,
                          on_checkpoint=on_checkpoint if args.checkpoint_every else None)
    path = save_policy(policy, args.out, overwrite=args.overwrite)
    info = policy.train_info
    print(json.dumps({
        "out": str(path),
        "policy": args.policy,
        "parameters": policy.num_parameters(),
        "episodes": len(episodes),
        "samples": info["num_samples"],
        "kept_samples": info.get("num_kept", info["num_samples"]),
        "steps": info["steps"],
        "step_budget": budget,
        "selection": selection.describe(),
        "final_loss": info["step_losses"][-1],
        "content_hash": compute_policy_hash(policy),
        "checkpoints": saved,
    }, indent=2))
    return 0


def read_id_file(path: str, *, flag: str) -> list[str]:
    """Episode ids from a score table (``.parquet``: its ``episode_id`` column) or a text
    file (one id a line; blank lines and ``#`` comments skipped)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r} is not a file", hint="give a score table (.parquet) or a file of ids")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["episode_id"])
        except Exception as exc:  # noqa: BLE001 - any unreadable Parquet is the user's file
            raise ConfigError(f"{flag} {path!r} is not a table with an 'episode_id' column ({exc})") from None
        ids = [str(e) for e in table.column("episode_id").to_pylist()]
    else:
        with open(path) as f:
            ids = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise ConfigError(f"{flag} {path!r} lists no episodes")
    return ids


@dataclasses.dataclass
class Selection:
    """The episodes one ``train`` call uses and the full split the step budget refers to."""

    ids: list[str]
    subset: bool
    how: str
    reference_episodes: int
    reference_samples: int

    def describe(self) -> str:
        return f"{len(self.ids)} episodes ({self.how})"


def select_episodes(catalog, data: str, *, split: str | None, keep: str | None, exclude: str | None,
                    episodes: str | None) -> Selection:
    """Resolve ``--split/--keep/--exclude/--episodes`` against a dataset catalog.

    ``--keep``/``--episodes`` name the episodes to use (from every split unless ``--split``
    is given); ``--exclude`` removes ids from the split. Unknown ids are an error naming
    them; the reference for the step budget is the dataset's ``train`` split (one sample
    per step, so its sample count is the sum of its episode lengths).
    """
    if keep and episodes:
        raise ConfigError("--keep and --episodes both name the episodes to train on", hint="give one of them")
    rows = catalog.select(["episode_id", "split", "length"]).to_pylist()
    split_of = {r["episode_id"]: r["split"] for r in rows}
    length_of = {r["episode_id"]: int(r["length"]) for r in rows}
    train_ids = [r["episode_id"] for r in rows if r["split"] == "train"]
    ref_eps = len(train_ids) or len(rows)
    ref_samples = sum(length_of[e] for e in train_ids) if train_ids else sum(length_of.values())
    named = None
    if keep:
        named, how = read_id_file(keep, flag="--keep"), f"--keep {keep}"
    elif episodes:
        spec = episodes[1:] if episodes.startswith("@") else None
        named = read_id_file(spec, flag="--episodes") if spec else [e.strip() for e in episodes.split(",") if e.strip()]
        how = "--episodes"
    if named is not None:
        unknown = [e for e in named if e not in split_of]
        if unknown:
            raise ConfigError(f"{len(unknown)} episode(s) to keep are not in the dataset (first: {unknown[:3]})",
                              where=data, hint="check the ids and the --data path")
        pool = set(named)
        if split not in (None, "all"):
            pool = {e for e in pool if split_of[e] == split}
            how += f", split {split!r}"
        ids = [r["episode_id"] for r in rows if r["episode_id"] in pool]  # dataset order
    else:
        use = "train" if split is None else split
        ids = [r["episode_id"] for r in rows if use == "all" or r["split"] == use]
        how = f"split {use!r}"
    if exclude:
        drop = read_id_file(exclude, flag="--exclude")
        unknown = [e for e in drop if e not in split_of]
        if unknown:
            raise ConfigError(f"{len(unknown)} episode(s) to exclude are not in the dataset (first: {unknown[:3]})",
                              where=data, hint="check the ids and the --data path")
        dropset = set(drop)
        before = len(ids)
        ids = [e for e in ids if e not in dropset]
        how += f" minus {before - len(ids)} excluded by {exclude}"
        if before - len(ids) < len(dropset):
            how += f" ({len(dropset) - (before - len(ids))} excluded ids were not in the selection)"
    if not ids:
        raise ConfigError(f"no episodes left to train on ({how})", where=data)
    full = named is None and not exclude
    return Selection(ids=ids, subset=not full, how=how, reference_episodes=ref_eps, reference_samples=ref_samples)


def read_weights(path: str, column: str, ids: list[str]) -> dict[str, float]:
    """``episode id -> weight`` for ``ids`` from a Parquet or CSV table; every id needs a
    finite weight >= 0 and at least one must be positive."""
    import numpy as np
    import pyarrow as pa

    if not os.path.isfile(path):
        raise ConfigError(f"--weights {path!r} is not a file")
    try:
        if path.endswith(".csv"):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"--weights {path!r} cannot be read as a table ({exc})") from None
    for col in ("episode_id", column):
        if col not in table.column_names:
            raise ConfigError(f"--weights {path!r} has no column {col!r}", hint=f"columns: {table.column_names}")
    raw = dict(zip((str(e) for e in table.column("episode_id").to_pylist()), table.column(column).to_pylist()))
    missing = [e for e in ids if e not in raw]
    if missing:
        raise ConfigError(f"--weights {path!r} has no weight for {len(missing)} episode(s) to train on "
                          f"(first: {missing[:3]})")
    out = {}
    for e in ids:
        try:
            w = float(raw[e])
        except (TypeError, ValueError):
            w = float("nan")
        if not np.isfinite(w) or w < 0:
            raise ConfigError(f"--weights {path!r}: episode {e!r} has weight {raw[e]!r}",
                              hint=f"column {column!r} needs finite weights >= 0")
        out[e] = w
    if not any(w > 0 for w in out.values()):
        raise ConfigError(f"--weights {path!r}: every episode to train on has weight 0")
    return out


def step_budget(samples: int, config) -> int:
    """Optimizer steps ``epochs × ceil(samples / batch_size)`` of ``config`` on ``samples``."""
    return int(config.epochs) * max(1, math.ceil(int(samples) / int(config.batch_size)))
