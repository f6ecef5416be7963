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
  activities watermark, and social_isolation is evaluated only on days settled for
  both streams (so a user without any activity record is never evaluated for it).
  Too little data in a window leaves the state as it was; an event is written when
  the state changes (initially not raised). The flag history is then independent of
  batching.
"""

from engine.rules.batch import (
    ActivityBatch,
    ActivityRecord,
    Profiles,
    SampleBatch,
    SampleRecord,
    WatermarkLog,
)
from engine.rules.config import Rules, default_rules, load_rules, parse_rules
from engine.rules.engine import RulesEngine, RulesOutput

__all__ = [
    "ActivityBatch",
    "ActivityRecord",
    "Profiles",
    "Rules",
    "RulesEngine",
    "RulesOutput",
    "SampleBatch",
    "SampleRecord",
    "WatermarkLog",
    "default_rules",
    "load_rules",
    "parse_rules",
]
