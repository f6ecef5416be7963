"""Who may be analysed, and when: research-consent periods (health data: consent is the law).

One place to ask, so linkage, evaluation and indicators follow replay's consent
rule (engine.consent: consent given and enrolled, not withdrawn, not left). A
person is analysed if they have a consent period; only their records from inside
their periods are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.ingest.log import EmbeddedLog


@dataclass(frozen=True)
class ResearchConsent:
    people: set[str]
    refused: int  # people with a profile and no consent period
    _consent: object

    @staticmethod
    def of(log: EmbeddedLog) -> ResearchConsent:
        from replay.export import Consent

        consent = Consent.of(log)
        return ResearchConsent(set(consent.periods), consent.refused, consent)

    def contains(self, users: list[str], user_idx: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """Per row: is (user, time) inside one of the person's consent periods?"""
        return self._consent.contains(users, user_idx, ts_ms)  # type: ignore[attr-defined,no-any-return]


def research_consenting(log: EmbeddedLog) -> tuple[set[str], int]:
    """(people with a research-consent period, people with a profile and none)."""
    consent = ResearchConsent.of(log)
    return consent.people, consent.refused
