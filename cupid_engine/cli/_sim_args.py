"""Flags of the simulated-task commands (``generate``, ``rollout``), defined once."""

from __future__ import annotations

import argparse


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """``--task``, ``--vary KNOB=LO:HI`` (repeatable) and ``--horizon``; parsed by the
    command (``sim.tasks.canonical_task``, ``sim.tasks.parse_variation``)."""
    p.add_argument("--task", default=None, help="lift, can (PickPlaceCan) or square (NutAssemblySquare)")
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KNOB=LO:HI",
        help="per-episode environment variation, repeatable: mass_scale, friction_scale, "
        "size_scale (lift only), placement_scale; e.g. --vary mass_scale=0.5:2",
    )
    p.add_argument("--horizon", type=int, default=None, help="step limit per episode (default per task)")
