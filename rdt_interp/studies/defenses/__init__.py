"""Defense comparison on a VLA: no defense, AdaShield, VLM-Guard, RDT, RDT+ and probe-gated RDT+.

:mod:`.config` (:class:`DefensesConfig`), :mod:`.results` (the result values the figures read)
and :mod:`.pipeline` (:func:`run_defenses`); see :mod:`.pipeline` for what each defense does.
"""

from rdt_interp.studies.defenses.config import (
           DEFENSE_LABELS,
           DEFENSES,
           STEERED,
           DefensesConfig,
           condition_key,
)
from rdt_interp.studies.defenses.pipeline import (
           DefenseContext,
           closed_loop_success,
           run_defenses,
           zero_motion_rate,
)
from rdt_interp.studies.defenses.results import DefenseCondition, DefensesResult, load_defenses

__all__ = ["DEFENSES", "DEFENSE_LABELS", "STEERED", "DefenseCondition", "DefenseContext", "DefensesConfig",
           "DefensesResult", "closed_loop_success", "condition_key", "load_defenses", "run_defenses",
           "zero_motion_rate"]
