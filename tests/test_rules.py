from __future__ import annotations

from pathlib import Path

import pytest

from bridge import rules
from bridge.envelope import Envelope, EnvelopeError
from bridge.rules import RuleError


def event(event_type: str, **data: object) -> Envelope:
    return Envelope("evt-1", event_type, None, dict(data))


def test_default_catalogue_covers_the_platform_events() -> None:
    catalogue = rules.load(None)
    assert {
        "PURCHASE_CREATED",
        "PURCHASE_CONFIRMED",
        "TRAINER_ALLOCATED",
        "SESSIONS_GENERATED",
        "ALLOCATION_UPDATED",
    } <= set(catalogue)


def test_purchase_created_becomes_course_purchased() -> None:
    rule = rules.load(None)["PURCHASE_CREATED"]
    outcome = rules.apply(
        rule,
        event(
            "PURCHASE_CREATED",
            studentId="s1",
            courseId="c1",
            purchaseId="p1",
            purchaseTier=30,
            internalNote="not copied",
        ),
    )
    assert outcome.cache_keys == ["student:home:s1", "student:learning:s1"]
    [notification] = outcome.notifications
    assert notification.user_id == "s1"
    assert notification.event == "COURSE_PURCHASED"
    assert notification.data == {"purchaseId": "p1", "courseId": "c1", "purchaseTier": 30}
    assert notification.invalidate == ("home", "learning")
    # The type too: an id reused by another kind of event is not a duplicate.
    assert notification.dedupe_key == "ev:PURCHASE_CREATED:evt-1"


def test_missing_recipient_is_an_envelope_error() -> None:
    rule = rules.load(None)["PURCHASE_CREATED"]
    with pytest.raises(EnvelopeError, match=r"data\.studentId"):
        rules.apply(rule, event("PURCHASE_CREATED", courseId="c1"))


def test_rename_and_several_recipients(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        """
[LESSON_MOVED]
notification = "LESSON_RESCHEDULED"
recipients = ["studentId", "trainerId"]
fields = ["lessonId", "slot"]
rename = { slot = "timeSlot" }
invalidate = ["learning"]
cache_keys = ["lesson:{lessonId}"]
"""
    )
    rule = rules.load(str(path))["LESSON_MOVED"]
    outcome = rules.apply(
        rule, event("LESSON_MOVED", studentId="s1", trainerId="t1", lessonId="l1", slot="6:00")
    )
    assert [n.user_id for n in outcome.notifications] == ["s1", "t1"]
    assert outcome.notifications[0].data == {"lessonId": "l1", "timeSlot": "6:00"}
    assert outcome.cache_keys == ["lesson:l1"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[X]\nnotification = "Y"\nrecipients = ["a"]\nrecipient = ["a"]', "unknown key"),
        ('[X]\nrecipients = ["a"]', "notification must be"),
        ('[X]\nnotification = "Y"', "recipients must name"),
        ('[X]\nnotification = "Y"\nrecipients = ["a"]\ncache_keys = ["k:{b}"]', "uses 'b'"),
        ('[X]\nnotification = "Y"\nrecipients = ["a"]\ncache_keys = ["k:{a"]', "bad cache key"),
        ('[X]\nnotification = "Y"\nrecipients = ["a"]\nrename = { b = "c" }', "not in fields"),
        ('[x]\nnotification = "Y"\nrecipients = ["a"]', "event types are written"),
        ('[X]\nnotification = "Y"\nrecipients = ["a"]\ninvalidate = ["Home"]', "invalid entry"),
        ("not toml [", "rules.toml"),
    ],
)
def test_invalid_rules_are_refused_at_load(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(body)
    with pytest.raises(RuleError, match=message):
        rules.load(str(path))
