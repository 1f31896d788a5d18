"""Keeps configs written for kmrun 0.1 composing.

kmrun runs its grids and studies itself (``runner.api.sweep``) and needs nothing from
Hydra's sweeper plugins. Configs from kmrun 0.1 still carry ``override hydra/sweeper:
kmrun`` in their defaults list; this registers that option so they compose unchanged.
Hydra imports every module under ``hydra_plugins`` at start-up, so this stays tiny.
"""

# No `from __future__ import annotations`: Hydra loads this module outside sys.modules,
# where dataclasses cannot resolve string annotations.
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class KmrunSweeperConf:
    _target_: str = "runner.api.sweep"  # never instantiated: kmrun runs sweeps itself


ConfigStore.instance().store(group="hydra/sweeper", name="kmrun", node=KmrunSweeperConf, provider="kmrun")
