"""The shape of a COCO annotation file: the types of its entries, checked before anything reads them.

Exports from labelling tools get ids as strings, boxes as text, entries that are not objects; the
loader and ``detrkit data check`` use this one check, so both name the same field of the same entry.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

MAX_ID = 2**63 - 1  # ids become int64 tensors
MAX_PROBLEMS = 200  # enough to see the pattern; a broken file can have millions


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_ID <= value <= MAX_ID


def _is_whole(value: Any) -> bool:
    """An integer, or a float with no fractional part (some exporters write 640.0)."""
    return _is_int(value) or (_is_number(value) and float(value).is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problems(kind: str, index: int, entry: Any) -> Iterator[tuple[str, str]]:
    where = f"{kind}[{index}]"
    if not isinstance(entry, Mapping):
        yield "malformed entries", f"{where} is {type(entry).__name__} {entry!r:.40}, not an object"
        return

    def field(name: str, check, expected: str, required: bool = True):
        if name not in entry:
            if required:
                yield "malformed entries", f"{where} (id {entry.get('id')!r:.30}) has no '{name}'"
            return
        if not check(entry[name]):
            yield "malformed entries", f"{where}.{name} = {entry[name]!r:.40}: expected {expected}"

    yield from field(
        "id", _is_int, "an integer", required=kind != "annotations" or "segments_info" not in entry
    )
    if kind == "images":
        yield from field("file_name", lambda v: isinstance(v, str) and v.strip(), "a file name")
        for name in ("width", "height"):
            yield from field(name, lambda v: _is_whole(v) and v > 0, "a positive integer", required=False)
    elif kind == "annotations":
        yield from field("image_id", _is_int, "an integer")
        if "segments_info" in entry:  # COCO panoptic
            yield from field("file_name", lambda v: isinstance(v, str) and v.strip(), "a PNG file name")
            segments = entry["segments_info"]
            if not isinstance(segments, list):
                yield "malformed entries", f"{where}.segments_info: expected a list"
                return
            for j, segment in enumerate(segments):
                for problem in _entry_problems("segments_info", j, segment):
                    yield problem[0], f"{where}.{problem[1]}"
            return
        yield from field("category_id", _is_int, "an integer")
        yield from field(
            "bbox",
            lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
            "[x, y, width, height], 4 finite numbers",
            required=False,
        )
        yield from field("iscrowd", lambda v: _is_whole(v) and v in (0, 1), "0 or 1", required=False)
    elif kind == "segments_info":
        yield from field("category_id", _is_int, "an integer")
        yield from field("iscrowd", lambda v: _is_whole(v) and v in (0, 1), "0 or 1", required=False)
    elif kind == "categories":
        yield from field("name", lambda v: isinstance(v, str), "a string", required=False)


def structure_problems(data: Any) -> list[tuple[str, str]]:
    """``(kind, detail)`` for every structural problem of a COCO instances or panoptic file
    (at most ``MAX_PROBLEMS``): missing lists, entries that are not objects, fields of the wrong
    type, duplicate ids, no images at all. Empty when the file can be read safely."""
    if not isinstance(data, Mapping):
        return [("malformed file", f"the file holds {type(data).__name__}, not a JSON object")]
    problems: list[tuple[str, str]] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(("missing field", f"no '{key}' list"))
    if problems:
        return problems
    if not data["images"]:
        problems.append(("no images", "the 'images' list is empty"))
    for kind in ("images", "annotations", "categories"):
        for index, entry in enumerate(data[kind]):
            for problem in _entry_problems(kind, index, entry):
                problems.append(problem)
                if len(problems) >= MAX_PROBLEMS:
                    return problems
    for kind, name in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        ids = Counter(e["id"] for e in data[kind] if isinstance(e, Mapping) and _is_int(e.get("id")))
        problems.extend(
            (f"duplicate {name} ids", f"{name} id {i} is used {n} times") for i, n in ids.items() if n > 1
        )
    return problems
