"""The influence explorer: a static site to look at what the scores say.

:func:`build_site` writes an overview (outcomes, score distributions per label, what each
method filters, audit decisions), a page per rollout (filmstrip, influence over its steps,
top demos with their frames aligned at the steps that carry the influence) and a page per
demo (its scores, the rollouts it influenced most). See :mod:`cupid_engine.explorer.site`
for the layout and :mod:`cupid_engine.explorer.collect` for the numbers.
"""

from cupid_engine.explorer.collect import Influences, RolloutDetail, influences, rollout_detail
from cupid_engine.explorer.frames import Filmstrip, filmstrip
from cupid_engine.explorer.site import build_site, episode_hash

__all__ = ["Filmstrip", "Influences", "RolloutDetail", "build_site", "episode_hash", "filmstrip", "influences",
           "rollout_detail"]
