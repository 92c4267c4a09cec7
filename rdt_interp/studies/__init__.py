"""Studies: declarative configs -> resumable run directories with results and figures.

* :mod:`.steering` -- :class:`SteeringSpec`, how a direction is applied (RDT, RDT+), one value;
* :mod:`.store` -- :class:`ActionSet` predictions and the one :class:`PredictionStore`;
* :mod:`.executor` -- :class:`Executor` / :class:`LocalExecutor` (sharded:
  :class:`rdt_interp.distributed.executor.ShardedExecutor`);
* :mod:`.rundir` -- :class:`RunDir`; :mod:`.config` -- the study config schema;
  :mod:`.study` -- ``rdt-interp run``;
* :mod:`.chat`, :mod:`.vla`, :mod:`.defenses` -- the studies, each a package with its config,
  pipeline and result types.
"""

from rdt_interp.studies.executor import Condition, Executor, LocalExecutor
from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.steering import SteeringSpec
from rdt_interp.studies.store import ActionSet, PredictionStore

__all__ = ["ActionSet", "Condition", "Executor", "LocalExecutor", "PredictionStore", "RunDir", "SteeringSpec"]
