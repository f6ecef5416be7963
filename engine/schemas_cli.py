"""`genki schemas`: write the JSON Schema of every wire record into schemas/."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from engine.schemas import METRICS, TOPICS, WIRE_MODELS

SCHEMAS_DIR_DEFAULT = Path(__file__).resolve().parent.parent / "schemas"


def render_schemas() -> dict[str, bytes]:
    """File name → bytes, for every wire model plus the metric table."""
    files: dict[str, bytes] = {}
    for name, model in WIRE_MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://genki.example/schemas/{name}.json"
        schema["x-topics"] = sorted(t for t, m in TOPICS.items() if m == name)
        files[f"{name}.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    metrics = [
        {"metric": m.name, "unit": m.unit, "loinc": m.loinc, "open_mhealth": m.omh,
         "min": m.value_min, "max": m.value_max, "description": m.description}
        for m in METRICS
    ]
    files["metrics.json"] = orjson.dumps(metrics, option=orjson.OPT_INDENT_2) + b"\n"
    return files


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_schemas().items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written


def _cmd_schemas(args: argparse.Namespace) -> int:
    for path in write_schemas(args.out):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("schemas", help="write JSON Schema files for the wire records")
    parser.add_argument("--out", type=Path, default=SCHEMAS_DIR_DEFAULT)
    parser.set_defaults(func=_cmd_schemas)
