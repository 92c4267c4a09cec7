"""The chat study's data filter and its report of departures (tiny model, planted filter)."""

from __future__ import annotations

import pytest

from rdt_interp.directions.selection import FilteredPrompts, SelectionConfig
from rdt_interp.errors import ConfigError
from rdt_interp.models import load_chat_model
from rdt_interp.prompts import load_split
from rdt_interp.studies.chat import (
    ChatRefusalConfig,
    chat_run_dir,
    chat_splits,
    departures,
)
from rdt_interp.studies.chat import pipeline as chat_refusal


def _keep_every_other(model, harmful, harmless, *, batch_size=32):
    h, hl = list(harmful), list(harmless)
    return FilteredPrompts(h[::2], hl[::2], [1.0] * len(h), [-1.0] * len(hl))


def test_filtered_splits_come_from_the_kept_prompts_of_the_whole_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_refusal, "filter_prompts", _keep_every_other)
    model = load_chat_model("tiny-qwen2")
    cfg = ChatRefusalConfig(n_train=8, n_test=4, alpha_val_n=6, selection=SelectionConfig(final_n=5))
    run = chat_run_dir(tmp_path / "chat", cfg)
    splits = chat_splits(model, cfg, run)
    counts = run.load("filter")["counts"]
    every_harmful = load_split("harmful_train").instructions
    # every harmful train prompt is scored, and only kept ones (every other here) are used
    assert counts["harmful_train"] == {"pool": len(every_harmful), "kept": (len(every_harmful) + 1) // 2, "used": 8}
    assert set(splits["harmful_train"]) <= set(every_harmful[::2])
    assert counts["harmless_train"] == {"pool": 16, "kept": 8, "used": 8}
    assert len(splits["harmful_val"]) == 5 and len(splits["harmless_val"]) == 6  # max(final_n, alpha_val_n)
    # test prompts are never filtered
    assert splits["harmful_test"] == load_split("harmful_test").take(4, seed=0).instructions
    assert run.timings()["filter"] >= 0  # cached as a timed step
    assert chat_splits(model, cfg, run) == splits


def test_too_few_prompts_left_by_the_filter_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_refusal, "filter_prompts",
                        lambda m, h, hl, batch_size=32: FilteredPrompts([], list(hl), [], []))
    model = load_chat_model("tiny-qwen2")
    cfg = ChatRefusalConfig(n_train=8, n_test=4, alpha_val_n=4, selection=SelectionConfig(final_n=4))
    with pytest.raises(ConfigError, match="pass the data filter") as err:
        chat_splits(model, cfg, chat_run_dir(tmp_path / "chat", cfg))
    assert "filter_data = false" in str(err.value)


def test_the_reference_configuration_has_no_departures_and_each_other_setting_is_named():
    ref_model = load_chat_model("tiny-qwen2", template="reference")
    assert departures(ref_model, ChatRefusalConfig()) == []
    own = load_chat_model("tiny-qwen2", template="model")
    named = departures(own, ChatRefusalConfig(filter_data=False, alphas=(1.0, 2.0),
                                              selection=SelectionConfig(steering_alpha=2.0)))
    assert len(named) == 4
    assert any("chat template" in d for d in named) and any("no data filtering" in d for d in named)
    assert any("coefficient 2" in d for d in named) and any("[1.0, 2.0]" in d for d in named)
