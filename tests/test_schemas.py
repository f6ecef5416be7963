from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.schemas import METRICS, SampleSegment
from engine.schemas_cli import render_schemas
from tests.conftest import REPO_ROOT


def test_schema_files_match_the_models() -> None:
    rendered = render_schemas()
    on_disk = {p.name: p.read_bytes() for p in (REPO_ROOT / "schemas").glob("*.json")}
    assert sorted(on_disk) == sorted(rendered), "run `genki schemas` to regenerate"
    for name, content in rendered.items():
        assert on_disk[name] == content, f"schemas/{name} drifted: run `genki schemas`"


def test_every_metric_has_a_unit_and_a_code() -> None:
    assert [m.code for m in METRICS] == list(range(len(METRICS)))
    for metric in METRICS:
        assert metric.unit
        assert metric.loinc or metric.omh
        assert metric.value_min < metric.value_max


def test_sample_segment_rejects_unit_mismatch_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="unit"):
        SampleSegment(v=1, upload_id="u1", user_id="P1", device_id="d1", metric="steps",
                      unit="kg", ts_ms=[1_700_000_000_000], values=[5.0])
