"""The shim Hydra needs to find kmrun's sweeper. The logic lives in ``runner.sweep``.

Hydra imports every module under ``hydra_plugins`` at start-up, so this one stays tiny
and imports nothing heavy.
"""

# No `from __future__ import annotations`: Hydra loads this module outside sys.modules,
# where dataclasses cannot resolve string annotations.
from dataclasses import dataclass
from typing import Any, List

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class KmrunSweeperConf:
    _target_: str = "hydra_plugins.kmrun_sweeper.kmrun_sweeper.KmrunSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="kmrun", node=KmrunSweeperConf, provider="kmrun")


class KmrunSweeper(Sweeper):
    """Runs grids and Optuna studies; see ``runner.sweep``."""

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.hydra_context, self.config = hydra_context, config

    def sweep(self, arguments: List[str]) -> Any:
        from runner.sweep import run_sweep

        return run_sweep(self.hydra_context, self.config, arguments)
