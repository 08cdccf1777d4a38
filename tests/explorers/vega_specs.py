"""Reading the Vega-Lite that the page receives: units, their marks, data rows and encodings."""

from __future__ import annotations


def units(spec: dict, data: str | None = None) -> list[tuple[dict, str | None]]:
    data = spec.get("data", {}).get("name", data)
    if "layer" in spec:
        return [unit for child in spec["layer"] for unit in units(child, data)]
    return [(spec, data)]


def mark(unit: dict) -> str:
    return unit["mark"] if isinstance(unit["mark"], str) else unit["mark"]["type"]


def rows(spec: dict, mark_type: str) -> list[dict]:
    """Data rows of the units drawing ``mark_type`` (all of them together)."""
    found = [spec["datasets"][name] for unit, name in units(spec) if mark(unit) == mark_type and name]
    assert found, f"no {mark_type} unit with data in this spec"
    return [row for data in found for row in data]


def rows_or_none(spec_dict: dict, mark_type: str) -> list[dict]:
    found = [spec_dict["datasets"].get(name, []) for unit, name in units(spec_dict) if mark(unit) == mark_type]
    return [row for data in found for row in data]


def encoding(spec: dict, mark_type: str, channel: str) -> dict:
    return next(unit["encoding"][channel] for unit, _ in units(spec) if mark(unit) == mark_type)


def layers_drawn(spec: dict, mark_type: str = "line") -> list[str]:
    return list(dict.fromkeys(row["layer"] for row in rows(spec, mark_type)))


def spec(app, name: str) -> dict:
    return app.charts[name].spec
