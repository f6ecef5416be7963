"""Who may be analysed: people whose profile gives research consent (health data: consent is the law).

One place to ask, so evaluation, linkage and indicators follow whatever replay's
consent rule is.
"""

from __future__ import annotations

from engine.ingest.log import EmbeddedLog


def research_consenting(log: EmbeddedLog) -> tuple[set[str], int]:
    """(user ids with research consent, how many people were left out)."""
    from replay.export import _consenting_users

    return _consenting_users(log)
