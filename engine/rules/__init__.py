"""Rules: vectorised health points and frailty-risk flags (the pure core of genki).

    engine = RulesEngine(load_rules(path), profiles)
    out = engine.process(samples, activities)   # SampleBatch, ActivityBatch (batch.py)
    out.awards                                   # list[EntryDraft]  (kind "award")
    out.flags                                    # list[FlagEvent]   (raised / cleared)

Semantics (pinned by tests/test_rules_differential.py against tests/rules_reference.py):

* Points are a function of the set of accepted data, whatever the batch split:
  per (user, Tokyo day) the steps samples (each rounded half-to-even) are summed;
  each tier reached is one entry worth its capped increment, entry id
  derive_id("award", user, day, "steps.tier<k>", k); late steps award exactly the
  new increments; a tier is never awarded twice; zero-point increments are skipped.
  Streaks count days at the target tier per Monday-Sunday week (entry on the
  Sunday, ts = end of the week). Activities: once per (user, day, kind, venue) or
  per (user, day, kind). Campaign entries ride on the award they extend.
* Thresholds are personal: steps_min x band percent x sex percent / 10000, rounded
  up; age = calendar year of the day - birth year; no profile = default band.
* Flags are evaluated per user per settled day d <= day(samples watermark) -
  settle_days. A sample whose record arrived after its day settled (judged by its
  wm_before_ms) counts for points but never for flags; activities likewise with the
  activities watermark. social_isolation also waits for the activities watermark,
  but at most activity_wait_days behind the samples clock (the person's syncs are
  the heartbeat), so people without any activity record are judged too. Too little
  data in a window makes a day unknown; the state moves with hysteresis
  (raise_after_days / clear_after_days known days in a row) and an event is written
  when it changes (initially not raised). The flag history is then independent of
  batching. See engine.rules.flags for the registry of flags.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Loaded on first use, so `engine.schemas` can read the flag registry
# (engine.rules.flags) without importing the whole engine.
_EXPORTS = {
    "ActivityBatch": "engine.rules.batch", "ActivityRecord": "engine.rules.batch",
    "Profiles": "engine.rules.batch", "SampleBatch": "engine.rules.batch",
    "SampleRecord": "engine.rules.batch", "WatermarkLog": "engine.rules.batch",
    "Rules": "engine.rules.config", "default_rules": "engine.rules.config",
    "load_rules": "engine.rules.config", "parse_rules": "engine.rules.config",
    "RulesEngine": "engine.rules.engine", "RulesOutput": "engine.rules.engine",
}
__all__ = ["ActivityBatch", "ActivityRecord", "Profiles", "Rules", "RulesEngine", "RulesOutput",
           "SampleBatch", "SampleRecord", "WatermarkLog", "default_rules", "load_rules",
           "parse_rules"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.rules' has no attribute {name!r}")
    return getattr(import_module(module), name)
