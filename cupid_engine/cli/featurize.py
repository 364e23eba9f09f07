"""``cupid-engine featurize``: featurise a dataset into a gradient store run.

Owns argument parsing only; the work is :func:`cupid_engine.featurize.featurize`
(imported inside the handler so ``--help`` stays instant and never imports ray).
"""

from __future__ import annotations

import argparse
import sys

from cupid_engine import constants as C

# Why each default output is chosen, in the order they are preferred.
_DEFAULT_OUTPUTS = (
    ("square", "the denoiser's E||eps_theta||^2 (CUPID Eq. 9), label-free"),
    ("energy", "label-free ||f_theta(o)||^2; the 'loss' gradient vanishes on rollouts of the policy's own "
               "(mean) actions, so rollout features would be noise"),
    ("loss", "the behaviour-cloning loss (the policy supports no label-free output)"),
)


def default_output(policy) -> tuple[str, str]:
    """The output function ``featurize`` uses when none is given, and why.

    Rollouts record the actions the policy executed (a deterministic MLP's prediction, a
    Gaussian MLP's mean), where the BC loss is at its minimum and its gradient is zero;
    influence scores need a rollout feature that does not vanish, so label-free outputs
    come first: ``square`` (diffusion), then ``energy``.
    """
    supported = tuple(getattr(policy, "supported_outputs", ()))
    for name, why in _DEFAULT_OUTPUTS:
        if name in supported:
            return name, why
    raise ValueError(f"{type(policy).__name__} supports none of the output functions {C.OUTPUT_FUNCTIONS}")


def _track(value: str):
    """``all`` / ``head`` / comma-separated module names."""
    if value in ("all", "head"):
        return value
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError("--track needs 'all', 'head' or module names")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``featurize`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "featurize", help="project per-sample gradients of a policy into a gradient store", description=__doc__
    )
    p.add_argument("--policy", required=True,
                   help="policy checkpoint directory (cupid-engine train --out), or module:factory / file.py:factory "
                        "returning any nn.Module with a policy-protocol task (cupid_engine.policies.PolicyTask)")
    p.add_argument("--data", required=True, help="dataset path or URL (LeRobot, robomimic, RLDS, replay buffer)")
    p.add_argument("--store", required=True, help="gradient store path or URL (created when missing)")
    p.add_argument("--run", required=True, help="run name inside the store")
    p.add_argument("--method", default="tensorsketch", choices=C.SKETCH_METHODS,
                   help="projection: tensorsketch (hooks, default) or dense/sparse/signshift (torch.func)")
    p.add_argument("--k", type=int, default=4096, help="feature dimension")
    p.add_argument("--seed", type=int, default=0, help="projection seed")
    p.add_argument("--output", default=None, choices=C.OUTPUT_FUNCTIONS,
                   help="output function (default per policy class: square for diffusion, energy for MLPs, "
                        "whose BC-loss gradient vanishes on their own rollouts; loss if neither is supported)")
    p.add_argument("--draws", type=int, default=64, help="(eps, t) draws per sample of diffusion outputs")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the diffusion noise draws")
    p.add_argument("--track", type=_track, default="all", help="all, head, or comma-separated module names")
    p.add_argument("--split", default=None, choices=C.SPLITS, help="only episodes of this split")
    p.add_argument("--obs-keys", default=None, metavar="K1,K2",
                   help="observation and camera keys to read (default: all the dataset has); unknown keys are "
                        "refused naming them and listing the dataset's keys")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per featuriser batch")
    p.add_argument("--max-rows", type=int, default=16384,
                   help="most (sample x draw) rows per forward/backward: diffusion outputs featurise at most "
                        "max-rows // draws samples at once (bounds activation memory)")
    p.add_argument("--dtype", default="float16", help="storage dtype: float32, float16, bfloat16, int8")
    p.add_argument("--shard-size", type=int, default=256, help="most episodes per store shard")
    p.add_argument("--backend", default="auto", help="projection kernel backend (auto, cpu, torch, triton, cuda)")
    p.add_argument("--device", default=None,
                   help="where the policy runs: cpu, cuda, cuda:N (default: cpu; features agree across devices)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors (1: in this process)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the gradient store at --store by a new one (swapped in only on success; "
                        "a folder that is not a store is never deleted)")
    p.add_argument("--replace", action="store_true",
                   help="accept new content under episode ids the store holds (same length): their shards "
                        "are featurised again in every run; without it, changed content is an error")
    p.set_defaults(handler=_featurize)


def _featurize(args: argparse.Namespace) -> int:
    from cupid_engine.distributed import executor_for
    from cupid_engine.featurize import FeaturizeConfig, featurize
    from cupid_engine.policies import load_policy
    from cupid_engine.policies.task import is_task_spec, load_task_spec

    output = args.output
    policy_kw: dict = {"policy": args.policy}
    if is_task_spec(args.policy):  # a policy the engine did not write: module:factory
        from cupid_engine.errors import ConfigError

        try:
            model, task = load_task_spec(args.policy)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc), where="--policy",
                              hint="give a checkpoint directory or module:factory returning a policy-protocol task"
                              ) from None
        policy_kw = {"task": task, "model": model}
    if output is None:
        policy = policy_kw.get("task") or load_policy(args.policy)
        output, why = default_output(policy)
        print(f"featurize: output {output!r} (default for {type(policy).__name__}: {why}; "
              "choose another with --output)", file=sys.stderr)
    try:
        config = FeaturizeConfig.for_method(
            args.method, k=args.k, seed=args.seed, backend=args.backend, output=output, draws=args.draws,
            track=args.track, batch_size=args.batch_size, dtype=args.dtype, shard_size=args.shard_size,
            max_rows=args.max_rows,
        ).replace(seed=args.noise_seed)  # for_method's seed is the projection's; this is the noise seed
    except ValueError as exc:
        from cupid_engine.errors import ConfigError

        raise ConfigError(str(exc), where="featurize options", hint="see cupid-engine featurize --help") from None
    data = args.data
    if args.obs_keys:
        from cupid_engine.data import open_source

        # Opened here so the reader selects the keys (and refuses unknown ones by name).
        data = open_source(args.data, obs_keys=[k.strip() for k in args.obs_keys.split(",") if k.strip()])
    run = featurize(
        data, args.store, args.run, **policy_kw, config=config, split=args.split,
        progress=not args.no_progress, executor=executor_for(args.workers, args.ray_address), device=args.device,
        overwrite=args.overwrite, replace=args.replace,
    )
    info = run.info()
    print(f"run {args.run!r} in {args.store}: k={config.projection.k}, method={config.projection.method}, "
          f"output={output}, shards {info['shards_done']}/{info['shards_total']}, finalized={info['finalized']}")
    desc = run.config.featurizer
    skipped = desc.get("untracked_parameters")
    line = f"tracked {desc['num_tracked_parameters']:,} parameters in {len(desc['tracked_modules'])} tensors/modules"
    if skipped:
        names = list(skipped["tensors"])
        line += (f"; NOT tracked: {skipped['count']:,} parameters in {len(names)} tensors "
                 f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    print(line)
    return 0
