"""Pure hot loops of the journal: validate drafts, sequence and hash them, check a chain.

These run over a million entries per call, so they work on plain tuples and
keep per-entry work to a few dict lookups, two orjson.dumps, one keyed tag
(a copied keyed BLAKE2b state, see canonical.PersonKey) and one SHA-256.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from engine.entries import Awards, EntryDraft
from engine.ledger.canonical import (
    GENESIS_HASH,
    HASH_HEX_CHARS,
    SHOP_KINDS,
    PersonKey,
)
from engine.ledger.commands import ref_fields
from engine.ledger.errors import InvalidEntry
from engine.schemas import ID_CHAR_CLASS, ID_CHARS_MAX, POINTS_PER_ENTRY_MAX, is_id

ENTRY_ID_CHARS_MAX = 128
TEXT_CHARS_MAX = 4096
TS_MS_MAX = 2**53 - 1  # exact in every JSON reader
CONTENT_FIELDS: tuple[str, ...] = (
    "entry_id", "user_id", "kind", "points", "day", "ts_ms", "rule", "ref", "rules_version",
)
# Sign each kind's points must have: +1 positive, -1 negative, 0 either (never zero).
KIND_SIGN: dict[str, int] = {"award": 1, "redeem": -1, "refund": 1, "expire": -1, "adjust": 0}
_KIND_NAME: dict[str, str] = {kind: kind for kind in KIND_SIGN}
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# (entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version)
Content = tuple[str, str, str, int, str | None, int, str | None, str | None, str | None]


def _int_of(name: str, value: object, entry_id: object) -> int:
    """Exact ints only; numpy integers are accepted and converted."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidEntry(f"entry {entry_id}: {name} must be an integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


class _Checker:
    """Validates drafts; remembers values already seen valid (users, days, rules repeat)."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.days: set[str | None] = {None}
        self.texts: set[str | None] = {None}

    def user(self, value: object, entry_id: str) -> None:
        if not is_id(value):
            raise InvalidEntry(f"entry {entry_id}: user_id {value!r} is not an id")
        self.users.add(value)

    def day(self, value: object, entry_id: str) -> None:
        if not isinstance(value, str) or not _DAY.match(value):
            raise InvalidEntry(f"entry {entry_id}: day {value!r} is not YYYY-MM-DD or null")
        self.days.add(value)

    def text(self, name: str, value: object, entry_id: str) -> None:
        if not isinstance(value, str) or len(value) > TEXT_CHARS_MAX:
            raise InvalidEntry(f"entry {entry_id}: {name} must be null or text of at most "
                               f"{TEXT_CHARS_MAX} characters, got {value!r:.80}")
        if len(self.texts) < 10_000:
            self.texts.add(value)


def normalise(drafts: Sequence[EntryDraft]) -> list[Content]:
    """Validate drafts and turn them into plain content tuples (raises InvalidEntry)."""
    check = _Checker()
    users, days, texts = check.users, check.days, check.texts
    out: list[Content] = []
    append = out.append
    for draft in drafts:
        entry_id = draft.entry_id
        if type(entry_id) is not str or not 0 < len(entry_id) <= ENTRY_ID_CHARS_MAX:
            raise InvalidEntry(f"entry_id must be 1-{ENTRY_ID_CHARS_MAX} characters, "
                               f"got {entry_id!r:.80}")
        kind = _KIND_NAME.get(draft.kind)  # type: ignore[call-overload]
        if kind is None:
            raise InvalidEntry(f"entry {entry_id}: kind {draft.kind!r} is not one of "
                               f"{', '.join(KIND_SIGN)}")
        points = draft.points
        if type(points) is not int:
            points = _int_of("points", points, entry_id)
        sign = KIND_SIGN[kind]
        if not (0 < points * sign if sign else points) or abs(points) > POINTS_PER_ENTRY_MAX:
            raise InvalidEntry(f"entry {entry_id}: points {points} not allowed for {kind} "
                               f"(sign {'+' if sign > 0 else '-' if sign < 0 else '±'}, "
                               f"not 0, at most {POINTS_PER_ENTRY_MAX})")
        ts_ms = draft.ts_ms
        if type(ts_ms) is not int:
            ts_ms = _int_of("ts_ms", ts_ms, entry_id)
        if not 0 <= ts_ms <= TS_MS_MAX:
            raise InvalidEntry(f"entry {entry_id}: ts_ms {ts_ms} out of range")
        user_id, day, rule, ref, rules_version = (
            draft.user_id, draft.day, draft.rule, draft.ref, draft.rules_version)
        if user_id not in users:
            check.user(user_id, entry_id)
        if day not in days:
            check.day(day, entry_id)
        if rule not in texts:
            check.text("rule", rule, entry_id)
        if ref is not None and (type(ref) is not str or len(ref) > TEXT_CHARS_MAX):
            check.text("ref", ref, entry_id)
        if kind == "redeem" or kind == "refund":
            _check_ref(kind, ref, entry_id)
        if rules_version not in texts:
            check.text("rules_version", rules_version, entry_id)
        append((entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version))
    return out


def _check_ref(kind: str, ref: object, entry_id: str) -> None:
    """Redemptions and refunds are settled per shop: their ref must name it."""
    fields = ref_fields(ref) if isinstance(ref, str) else {}
    if not isinstance(fields.get("shop"), str):
        raise InvalidEntry(f"entry {entry_id}: a {kind} needs ref JSON naming its shop")
    if kind == "refund" and not isinstance(fields.get("refund_of"), str):
        raise InvalidEntry(f"entry {entry_id}: a refund needs ref JSON naming refund_of")


def chain(contents: Iterable[Content], seq_head: int, hash_head: str,
          keys: Mapping[str, PersonKey]) -> tuple[list[tuple], list[tuple]]:
    """Entry rows (model.ENTRY_COLUMNS) and journal rows (JOURNAL_COLUMNS) after a head.

    Every user of `contents` must have a key. Inlines canonical.entry_tag
    (PersonKey.tag), canonical_bytes and chain_hash; a test holds them equal.
    """
    assert len(hash_head) == HASH_HEX_CHARS
    dumps, sort, sha256 = orjson.dumps, orjson.OPT_SORT_KEYS, hashlib.sha256
    pads = {user: key.pads() for user, key in keys.items()}
    rows: list[tuple] = []
    journal: list[tuple] = []
    append, append_journal = rows.append, journal.append
    seq, prev, prev_bytes = seq_head, hash_head, hash_head.encode("ascii")
    entry_id = ""
    try:
        for entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version in contents:
            seq += 1
            keyed, subject = pads[user_id]
            if kind in SHOP_KINDS:
                public, link = ref, dumps([entry_id, user_id, None])
            else:
                public, link = None, dumps([entry_id, user_id, ref])
            mac = keyed.copy()
            mac.update(link)
            tag = mac.hexdigest()
            canonical = dumps(
                {"day": day, "entry": tag, "kind": kind, "points": points, "ref": public,
                 "rule": rule, "rules_version": rules_version, "seq": seq, "subject": subject,
                 "ts_ms": ts_ms},
                option=sort,
            )
            digest = sha256(prev_bytes + canonical).hexdigest()
            append((seq, entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version,
                    prev, digest))
            append_journal((seq, subject, tag, kind, points, day, ts_ms, rule, public,
                            rules_version, prev, digest))
            prev, prev_bytes = digest, digest.encode("ascii")
    except orjson.JSONEncodeError as error:
        raise InvalidEntry(f"entry {entry_id}: not encodable as UTF-8 JSON: {error}") from error
    return rows, journal


ID_SEPARATOR = "\x1f"
_IDS = re.compile(rf"(?:{ID_CHAR_CLASS}{{1,{ID_CHARS_MAX}}}{ID_SEPARATOR})*")
# Entry ids the award template can put between quotes as they are (no JSON escapes).
_JSON_PLAIN = re.compile(r'[^"\\\x00-\x1f\ud800-\udfff]*')


def awards_row_by_row(awards: Awards) -> bool:
    """Check the shape of award columns; True when the batch must take the row-by-row
    path (`normalise` and `chain` over its drafts) instead of `chain_awards`.

    That is when any value would be refused (so the refusal is the same
    InvalidEntry, naming the same entry, whichever way the awards came), an
    entry id repeats within the batch (`_unique` sorts out identical and
    different repeats) or an entry id needs JSON escapes.
    """
    count = len(awards.entry_id)
    for name in ("user", "points", "day", "ts_ms", "rule", "ref"):
        column = getattr(awards, name)
        if not isinstance(column, np.ndarray) or column.shape != (count,) \
                or column.dtype.kind not in "iu":
            raise InvalidEntry(f"awards: column {name} must be {count} integers")
    if count == 0:
        return False
    tables = (("user", awards.user_ids), ("day", awards.days), ("rule", awards.rules),
              ("ref", awards.refs))
    used = {name: _used(getattr(awards, name), len(table), name) for name, table in tables}
    points, ts_ms = awards.points, awards.ts_ms
    if points.min() <= 0 or points.max() > POINTS_PER_ENTRY_MAX \
            or ts_ms.min() < 0 or ts_ms.max() > TS_MS_MAX:
        return True
    for entry_id in awards.entry_id:
        if type(entry_id) is not str or not 0 < len(entry_id) <= ENTRY_ID_CHARS_MAX:
            return True
    if not _all_ids([awards.user_ids[index] for index in used["user"]]):
        return True
    if not all(day is None or (isinstance(day, str) and _DAY.match(day))
               for day in (awards.days[index] for index in used["day"])):
        return True
    texts: list[str | None] = [awards.rules[index] for index in used["rule"]]
    texts += [awards.refs[index] for index in used["ref"]]
    if not all(text is None or (isinstance(text, str) and len(text) <= TEXT_CHARS_MAX)
               for text in (*texts, awards.rules_version)):
        return True
    try:
        orjson.dumps(texts)
    except orjson.JSONEncodeError:
        return True
    return len(set(awards.entry_id)) != count or \
        _JSON_PLAIN.fullmatch("".join(awards.entry_id)) is None


def _all_ids(values: list[str]) -> bool:
    """all(is_id(value)) in one regex pass (a value holding the separator is no id)."""
    if not values:
        return True
    try:
        joined = ID_SEPARATOR.join(values) + ID_SEPARATOR
    except TypeError:
        return False
    return joined.count(ID_SEPARATOR) == len(values) and _IDS.fullmatch(joined) is not None


def _used(index: np.ndarray, size: int, name: str) -> list[int]:
    used = np.unique(index)
    if used[0] < 0 or used[-1] >= size:
        raise InvalidEntry(f"awards: {name} index outside its table of {size}")
    return used.tolist()


def _json_table(table: Sequence[str | None], used: np.ndarray) -> list[str]:
    """JSON text of the table's used values ("" for the unused)."""
    out = [""] * len(table)
    for index in np.unique(used).tolist():
        out[index] = orjson.dumps(table[index]).decode()
    return out


def chain_awards(awards: Awards, seq_head: int, hash_head: str,
                 keys: Mapping[str, PersonKey]) -> tuple[list[tuple], list[tuple]]:
    """Sequence and hash checked award columns (`awards_row_by_row` said False).

    The same bytes as `chain` over the awards' drafts (canonical.py): the entry
    and tag JSON are written from templates, every distinct user, day, rule and
    ref encoded once. Returns journal rows (seq, subject, entry, points, day,
    ts_ms, rule, rules_version, prev_hash, hash: kind is "award" and the public
    ref null) and link rows (seq, entry_id, user_id, ref).
    """
    assert len(hash_head) == HASH_HEX_CHARS
    user_ids, days, rules, refs = awards.user_ids, awards.days, awards.rules, awards.refs
    pads: list = [None] * len(user_ids)
    for index in np.unique(awards.user).tolist():
        user_id = user_ids[index]
        keyed, subject = keys[user_id].pads()
        pads[index] = (keyed, subject, user_id, f'"{user_id}"')  # ids need no JSON escapes
    day_json = _json_table(days, awards.day)
    rule_json = _json_table(rules, awards.rule)
    ref_json = _json_table(refs, awards.ref)
    version_text = awards.rules_version
    version = orjson.dumps(version_text).decode()
    sha256 = hashlib.sha256
    journal: list[tuple] = []
    links: list[tuple] = []
    append_journal, append_link = journal.append, links.append
    seq, prev = seq_head, hash_head
    for entry_id, user, points, day, ts_ms, rule, ref in zip(
            awards.entry_id, awards.user.tolist(), awards.points.tolist(), awards.day.tolist(),
            awards.ts_ms.tolist(), awards.rule.tolist(), awards.ref.tolist(), strict=True):
        seq += 1
        keyed, subject, user_id, user_json = pads[user]
        mac = keyed.copy()
        mac.update(f'["{entry_id}",{user_json},{ref_json[ref]}]'.encode())
        tag = mac.hexdigest()
        digest = sha256(
            f'{prev}{{"day":{day_json[day]},"entry":"{tag}","kind":"award","points":{points},'
            f'"ref":null,"rule":{rule_json[rule]},"rules_version":{version},"seq":{seq},'
            f'"subject":"{subject}","ts_ms":{ts_ms}}}'.encode()).hexdigest()
        append_journal((seq, subject, tag, points, days[day], ts_ms, rules[rule], version_text,
                        prev, digest))
        append_link((seq, entry_id, user_id, refs[ref]))
        prev = digest
    return journal, links


class AwardRows(Sequence[tuple]):
    """Stored entry rows (model.ENTRY_COLUMNS) of appended awards, built when read."""

    def __init__(self, journal: list[tuple], links: list[tuple]) -> None:
        self._journal, self._links = journal, links

    def __len__(self) -> int:
        return len(self._journal)

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        seq, _, _, points, day, ts_ms, rule, version, prev, digest = self._journal[index]
        _, entry_id, user_id, ref = self._links[index]
        return (seq, entry_id, user_id, "award", points, day, ts_ms, rule, ref, version, prev,
                digest)


@dataclass(frozen=True, slots=True)
class ChainProblem:
    seq: int
    problem: str


class RefundTracker:
    """What each redemption can still give back; refunds must name one of the same user."""

    def __init__(self) -> None:
        self._open: dict[str, list] = {}  # redemption id -> [user_id, shop, refundable]

    def redeemed(self, entry_id: str, user_id: str, ref: str | None, points: int) -> None:
        assert points < 0
        self._open[entry_id] = [user_id, ref_fields(ref).get("shop"), -points]

    def refunded_before(self, redemption_id: str, points: int) -> None:
        self._open[redemption_id][2] -= points

    def refund(self, entry_id: str, user_id: str, ref: str | None,
               points: int) -> tuple[str, str] | None:
        """None when allowed (and recorded); else ("exceeds" | "invalid", message)."""
        fields = ref_fields(ref)
        refund_of = fields.get("refund_of")
        target = self._open.get(refund_of) if isinstance(refund_of, str) else None
        if target is None:
            return "invalid", f"refund {entry_id} names no earlier redemption ({refund_of})"
        if (target[0], target[1]) != (user_id, fields.get("shop")):
            return "invalid", (f"refund {entry_id} is for user {user_id} at shop "
                               f"{fields.get('shop')}, redemption {refund_of} was user "
                               f"{target[0]} at shop {target[1]}")
        if points > target[2]:
            return "exceeds", (f"refund {entry_id} of {points} points exceeds the {target[2]} "
                               f"left to refund of redemption {refund_of}")
        target[2] -= points
        return None


class ChainChecker:
    """Walks journal rows (with their links) in seq order: hashes, links, balances, refunds.

    Rows are JOURNAL_COLUMNS followed by the link's entry_id, user_id and
    private ref (all None once erased). `keys` maps live users to their key,
    `erased` holds the subjects of the erasure log. Balances are per subject,
    so they are checked never to go below zero for erased people too.
    """

    def __init__(self, keys: Mapping[str, PersonKey] | None = None,
                 erased: Iterable[str] = ()) -> None:
        self.seq = 0
        self.prev = GENESIS_HASH
        self.keys: Mapping[str, PersonKey] = keys or {}
        self.live = {key.subject: user for user, key in self.keys.items()}
        self.pads = {user: key.pads() for user, key in self.keys.items()}
        self.erased = set(erased)
        self.balances: dict[str, int] = {}  # by subject
        self.counts: dict[str, int] = {}
        self.linked = 0
        self.refunds = RefundTracker()

    def feed(self, rows: Iterable[Sequence]) -> ChainProblem | None:
        dumps, sort, sha256 = orjson.dumps, orjson.OPT_SORT_KEYS, hashlib.sha256
        balances, counts, pads, live, erased = (
            self.balances, self.counts, self.pads, self.live, self.erased)
        for row in rows:
            (seq, subject, tag, kind, points, day, ts_ms, rule, public, rules_version,
             prev_hash, stored_hash, entry_id, user_id, private) = row
            if seq != self.seq + 1:
                return ChainProblem(self.seq + 1, f"seq {self.seq + 1} missing (next is {seq})")
            if prev_hash != self.prev:
                return ChainProblem(seq, f"prev_hash {prev_hash!r:.20} does not match the hash "
                                         f"of seq {self.seq} ({self.prev:.16}…)")
            canonical = dumps(
                {"day": day, "entry": tag, "kind": kind, "points": points, "ref": public,
                 "rule": rule, "rules_version": rules_version, "seq": seq, "subject": subject,
                 "ts_ms": ts_ms},
                option=sort,
            )
            digest = sha256(prev_hash.encode("ascii") + canonical).hexdigest()
            if digest != stored_hash:
                return ChainProblem(seq, f"hash mismatch (stored {stored_hash:.16}…, recomputed "
                                         f"{digest:.16}…): the entry's content was altered")
            if user_id is not None:
                key_pads = pads.get(user_id)
                if key_pads is None or key_pads[1] != subject:
                    return ChainProblem(seq, f"the link of seq {seq} (entry {entry_id}, user "
                                             f"{user_id}) does not match its hashed entry")
                mac = key_pads[0].copy()
                mac.update(dumps([entry_id, user_id, private]))
                if mac.hexdigest() != tag:  # = PersonKey.tag
                    return ChainProblem(seq, f"the link of seq {seq} (entry {entry_id}, user "
                                             f"{user_id}) does not match its hashed entry")
                self.linked += 1
            elif subject in live:
                return ChainProblem(seq, f"seq {seq} of a person who is not erased has lost "
                                         "its link (entry id and user id)")
            elif subject not in erased:
                return ChainProblem(seq, f"seq {seq} names subject {subject:.12}… which is "
                                         "neither a person's nor in the erasure log")
            balance = balances.get(subject, 0)
            problem = _entry_problem(kind, points, balance, user_id or f"subject {subject}")
            if problem:
                return ChainProblem(seq, problem)
            if user_id is not None:
                problem = self._refund_problem(entry_id, user_id, kind, public, points)
                if problem:
                    return ChainProblem(seq, problem)
            balances[subject] = balance + points
            counts[subject] = counts.get(subject, 0) + 1
            self.seq, self.prev = seq, stored_hash
        return None

    def _refund_problem(self, entry_id: str, user_id: str, kind: str, ref: str | None,
                        points: int) -> str | None:
        if kind == "redeem":
            self.refunds.redeemed(entry_id, user_id, ref, points)
        elif kind == "refund":
            refused = self.refunds.refund(entry_id, user_id, ref, points)
            if refused:
                return refused[1]
        return None


def _entry_problem(kind: str, points: int, balance: int, user_id: str) -> str | None:
    sign = KIND_SIGN.get(kind)
    if sign is None:
        return f"unknown kind {kind!r}"
    if not (0 < points * sign if sign else points):
        return f"points {points} have the wrong sign for {kind}"
    if balance + points < 0:
        return f"balance of user {user_id} would go negative ({balance} {points:+d})"
    return None
