"""The chat side of the study: refusal direction of a chat model (extract, select, steer, evaluate).

:func:`run_chat_refusal` in :mod:`.pipeline`, configured by :class:`ChatRefusalConfig`.
"""

from rdt_interp.studies.chat.pipeline import (
    ChatRefusalConfig,
    chat_run_dir,
    chat_splits,
    departures,
    load_chat_results,
    run_chat_refusal,
)

__all__ = ["ChatRefusalConfig", "chat_run_dir", "chat_splits", "departures", "load_chat_results",
           "run_chat_refusal"]
