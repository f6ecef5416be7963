"""Rules: vectorised health points and frailty-risk flags.

The pure core of genki: `RulesEngine(rules, profiles).process(samples, activities)`
turns columnar batches into ledger entry drafts (awards) and flag events.
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
