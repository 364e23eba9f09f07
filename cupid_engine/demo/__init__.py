"""The end-to-end demo: the whole curation loop on the built-in robosuite benchmark.

``cupid-engine demo`` (what ``make demo`` runs) generates a small mixed-quality Lift
dataset with scripted demonstrators of known quality, trains a policy, collects
rollouts, featurises demos and rollouts into a gradient store, scores every demo with
CUPID, CUPID-Quality, QoQ and the baselines, prints the demos that most influenced one
failed rollout, and writes a report folder. Each stage is cached under the output folder,
so a re-run resumes where the last one stopped.
"""

from cupid_engine.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
