"""Every bound the HTTP API enforces, in one place, units last in the names."""

from __future__ import annotations

# Request bodies: ingest batches are large, commands are a few hundred bytes.
INGEST_BODY_BYTES_MAX = 32 * 1024 * 1024
COMMAND_BODY_BYTES_MAX = 64 * 1024
INGEST_RECORDS_PER_BATCH_MAX = 10_000

HISTORY_PAGE_ENTRIES_DEFAULT = 50
HISTORY_PAGE_ENTRIES_MAX = 500

# Redeem tokens shown as a QR code in the citizen's app.
TOKEN_TTL_S_DEFAULT = 120
TOKEN_TTL_S_MAX = 3_600
TOKEN_CHARS_MAX = 512

IDEMPOTENCY_KEY_CHARS_MAX = 128
# Stored responses and token claims: a retry after this long is a new request.
RESPONSES_KEPT_DAYS = 30
PRUNE_EVERY_WRITES = 1_000
AUTHORIZATION_CHARS_MAX = 256
# Shop keys remembered valid on the event loop (redemptions; revocation is checked on the
# writer thread); the memory is cleared when full.
KEYS_SEEN_MAX = 4_096
KEY_LABEL_CHARS_MAX = 64

# How long a request may wait for the ingest log or a write slot before 503.
WRITE_WAIT_S_MAX = 30.0

# A request's claim on its Idempotency-Key: a duplicate meanwhile is 409 in_progress while
# the claiming process lives, at most this long (longer than any wait for an outcome).
KEY_CLAIM_LEASE_S = 60

# Redemption limits of the programme (API config: `genki serve` flags or the environment
# variables below); None: no limit beyond the ledger's POINTS_PER_ENTRY_MAX.
POINTS_PER_REDEMPTION_MAX_ENV = "GENKI_API_POINTS_PER_REDEMPTION_MAX"
POINTS_PER_PERSON_PER_DAY_MAX_ENV = "GENKI_API_POINTS_PER_PERSON_PER_DAY_MAX"

# Group commit: shop commands applied in one ledger transaction at most.
COMMANDS_PER_BATCH_MAX = 256
