"""Validation of COCO segmentations before pycocotools sees them.

pycocotools trusts its input: a NaN polygon coordinate makes it allocate without bound, ``inf`` or
``1e12`` crash it, a compressed RLE that is too short decodes into garbage. These checks run once
per annotation file, vectorised with numpy, and say what is wrong with which annotation.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

POLYGON_RANGE = (-1.0, 2.0)  # polygon x within [-1, 2] x the image width, y the same with the height
MAX_IMAGE_SIDE = 1 << 24  # pycocotools rasterises polygons in int32 at 5x: 2 * side * 5 must fit
_BATCH = 1 << 22  # coordinates / RLE characters per vectorised pass (bounds the temporary arrays)
# A compressed RLE string: characters '0'..'o', the last one ending a number ('0'..'O'): with a
# continuation character ('P'..'o') last, pycocotools would read on past the end of the string.
_RLE_STRING = re.compile(rb"[0-o]*[0-O]")


def validate_segmentation(ann: Mapping[str, Any], width: Any, height: Any) -> str | None:
    """Why pycocotools must not decode ``ann["segmentation"]`` in a ``width`` x ``height`` image, or None.

    Polygons: a list of ``[x1, y1, x2, y2, ...]`` lists of numbers, at least 3 points each, every
    coordinate finite and within ``POLYGON_RANGE`` times the image size (points a little outside the
    image are normal; clipping is pycocotools' job). RLE: ``{"size": [height, width], "counts": ...}``
    with ``counts`` a list of non-negative run lengths summing to ``height * width`` (uncompressed,
    as COCO's crowd regions) or COCO's compressed ASCII string of such runs. No segmentation
    (missing, None or ``[]``) is fine here: box-only data; whoever needs the mask checks it is there.
    """
    return dict(find_bad_segmentations([(ann, width, height)])).get(0)


def find_bad_segmentations(items: Sequence[tuple[Mapping[str, Any], Any, Any]]) -> list[tuple[int, str]]:
    """:func:`validate_segmentation` over many ``(annotation, width, height)`` at once, vectorised.

    Returns ``(index into items, reason)`` for each unusable segmentation, in order.
    """
    problems: dict[int, str] = {}
    polygons = _Polygons()
    strings: list[tuple[int, bytes, int]] = []  # (item, compressed RLE counts, height * width)
    chars = 0
    for index, (ann, width, height) in enumerate(items):
        segm = ann.get("segmentation")
        if segm is None or (isinstance(segm, list) and not segm):
            continue
        if not (
            type(width) is int
            and type(height) is int
            and 0 < width <= MAX_IMAGE_SIDE
            and 0 < height <= MAX_IMAGE_SIDE
        ):
            reason = _image_size_problem(width, height)
            if reason is not None:
                problems[index] = reason
                continue
        if isinstance(segm, list):
            reason = polygons.add(index, segm, width, height)
            if polygons.numbers > _BATCH:
                problems.update(polygons.problems())
                polygons = _Polygons()
        elif isinstance(segm, dict):
            reason, counts = _rle_problem(segm, int(width), int(height))
            if counts is not None:
                strings.append((index, counts, int(width) * int(height)))
                chars += len(counts)
                if chars > _BATCH:
                    problems.update(_compressed_rle_problems(strings))
                    strings, chars = [], 0
        else:
            reason = (
                f"segmentation is {_describe(segm)}, expected polygons [[x1, y1, x2, y2, ...], ...] "
                "or an RLE {'size': [height, width], 'counts': ...}"
            )
        if reason is not None:
            problems[index] = reason
    problems.update(polygons.problems())
    if strings:
        problems.update(_compressed_rle_problems(strings))
    return sorted(problems.items())


def _describe(value: Any) -> str:
    text, name = repr(value), type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name} ({text if len(text) <= 40 else text[:37] + '...'})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _image_size_problem(width: Any, height: Any) -> str | None:
    for value in (width, height):
        if not (_is_number(value) and 1 <= value <= MAX_IMAGE_SIDE and float(value).is_integer()):
            return (
                f"the image's width and height ({width!r}, {height!r}) must be whole numbers in "
                f"1..{MAX_IMAGE_SIDE} to decode a mask"
            )
    return None


class _Polygons:
    """Polygon segmentations gathered for one vectorised check of all their coordinates."""

    def __init__(self) -> None:
        self.rings: list[list] = []
        self.owner: list[int] = []  # of each ring: its annotation, an index into self.items
        self.items: list[tuple[int, list, float, float]] = []  # (item, segmentation, width, height)
        self.numbers = 0

    def add(self, index: int, segm: list, width: Any, height: Any) -> str | None:
        """Check the structure now (a reason), the numbers with the others in :meth:`problems`."""
        numbers = 0
        for k, ring in enumerate(segm):
            if not isinstance(ring, list):
                return f"polygon {k} is {_describe(ring)}, not a list of coordinates [x1, y1, x2, y2, ...]"
            n = len(ring)
            if n and isinstance(ring[0], (list, tuple)):
                return (
                    f"polygon {k} is a list of points ({repr(ring[0])[:40]}, ...), not [x1, y1, x2, y2, ...]"
                )
            if n < 6:
                return f"polygon {k} has {n} number(s); a polygon needs at least 3 points (6 numbers)"
            if n % 2:
                return f"polygon {k} has an odd number of coordinates ({n}), not x, y pairs"
            numbers += n
        self.owner.extend([len(self.items)] * len(segm))
        self.rings.extend(segm)
        self.items.append((index, segm, float(width), float(height)))
        self.numbers += numbers
        return None

    def problems(self) -> dict[int, str]:
        """Every coordinate a finite number within range: {item: reason}."""
        if not self.rings:
            return {}
        try:
            values = np.array(list(itertools.chain.from_iterable(self.rings)))
        except (ValueError, TypeError, OverflowError):
            values = None
        if values is None or values.ndim != 1 or values.dtype.kind not in "iuf":
            return self._non_numbers()
        return self._out_of_range(values.astype(np.float64, copy=False))

    def _out_of_range(self, values: np.ndarray) -> dict[int, str]:
        lengths = np.fromiter(map(len, self.rings), dtype=np.int64, count=len(self.rings))
        ring_of_point = np.repeat(np.arange(len(self.rings)), lengths // 2)
        owner = np.asarray(self.owner)[ring_of_point]
        sizes = np.array([(w, h) for _, _, w, h in self.items])[owner]
        xy = values.reshape(-1, 2)
        low, high = POLYGON_RANGE
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(xy).all(1) & ((xy >= low * sizes) & (xy <= high * sizes)).all(1)
        if ok.all():
            return {}
        problems: dict[int, str] = {}
        first_point_of_ring = np.cumsum(lengths // 2) - lengths // 2
        bad = np.flatnonzero(~ok)
        _, first = np.unique(owner[bad], return_index=True)
        for p in bad[first]:  # the first bad point of each annotation
            r = ring_of_point[p]
            index, segm, w, h = self.items[owner[p]]
            k = next(k for k, ring in enumerate(segm) if ring is self.rings[r])
            x, y = xy[p]
            where = f"polygon {k} point {p - first_point_of_ring[r]} ({x:g}, {y:g})"
            if not np.isfinite(xy[p]).all():
                problems[index] = f"{where} is not finite"
            else:
                problems[index] = (
                    f"{where} is far outside the {w:g}x{h:g} image (coordinates must lie within "
                    f"x {low * w:g}..{high * w:g}, y {low * h:g}..{high * h:g})"
                )
        return problems

    def _non_numbers(self) -> dict[int, str]:
        """Something is not a number (rare): name it, and check the other annotations' polygons."""
        problems, rest = {}, _Polygons()
        for index, segm, w, h in self.items:
            for k, ring in enumerate(segm):
                reason = _non_number(ring)
                if reason is not None:
                    problems[index] = f"polygon {k} {reason}"
                    break
            else:
                rest.add(index, segm, w, h)
        if rest.rings:  # numbers all, python ints beyond int64 included
            values = np.array([float(v) for v in itertools.chain.from_iterable(rest.rings)])
            problems.update(rest._out_of_range(values))
        return problems


def _non_number(ring: list) -> str | None:
    for v in ring:
        if not _is_number(v):
            return f"holds {_describe(v)}, not a number"
        try:
            float(v)
        except OverflowError:
            return f"holds {_describe(v)}, too large for a coordinate"
    return None


def _whole_numbers(values: list) -> np.ndarray | None:
    """``values`` as a 1-d int64/uint64 array (12.0 counts: pycocotools casts to uint32), or None."""
    try:
        array = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 1 or not len(array):
        return None
    if array.dtype.kind == "f" and (array % 1 == 0).all() and abs(array).max() < 2**53:
        array = array.astype(np.int64)
    return array if array.dtype.kind in "iu" else None


def _rle_problem(segm: Mapping[str, Any], width: int, height: int) -> tuple[str | None, bytes | None]:
    """(reason, None), or (None, the compressed counts to decode), or (None, None) for a good RLE."""
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_number(v) for v in size)):
        return f"RLE size {size!r} is not [height, width]", None
    if list(size) != [height, width]:
        return f"RLE size {list(size)} does not match the {width}x{height} image ([{height}, {width}])", None
    if isinstance(counts, list):
        runs = _whole_numbers(counts)
        if runs is None:
            return (
                f"uncompressed RLE counts must be a non-empty list of whole numbers, not {_describe(counts)}",
                None,
            )
        if runs.min() < 0:
            return f"uncompressed RLE counts hold a negative run length ({runs.min()})", None
        if runs.max() > height * width or runs.sum() != height * width:
            return (
                f"uncompressed RLE counts sum to {runs.sum()}, not the {height}x{width} = {height * width} "
                "pixels of the image"
            ), None
        return None, None
    if isinstance(counts, str):
        if not counts.isascii():
            return "compressed RLE counts are not an ASCII string", None
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        return (
            f"RLE counts are {_describe(counts)}, expected a list of run lengths (uncompressed) or a "
            "string (compressed)"
        ), None
    if not _RLE_STRING.fullmatch(counts):
        return "compressed RLE counts are not a COCO RLE string (characters '0'..'o', whole numbers)", None
    return None, counts


def _compressed_rle_problems(strings: list[tuple[int, bytes, int]]) -> dict[int, str]:
    """Decode the run lengths of COCO's compressed RLE strings (all at once) and check their sums."""
    runs, string_of_run, too_long = _decode_rle_strings([s for _, s, _ in strings])
    first = np.searchsorted(string_of_run, np.arange(len(strings)))
    totals = np.add.reduceat(runs, first)
    lowest = np.minimum.reduceat(runs, first)
    problems = {}
    for (index, _, pixels), total, low, long in zip(
        strings, totals.tolist(), lowest.tolist(), too_long.tolist(), strict=True
    ):
        if long:
            problems[index] = "compressed RLE counts hold a number longer than 7 characters (over 32 bits)"
        elif low < 0:
            problems[index] = f"compressed RLE counts decode to a negative run length ({low})"
        elif total != pixels:
            problems[index] = f"compressed RLE counts cover {total} pixel(s), not the image's {pixels}"
    return problems


def _decode_rle_strings(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run lengths of COCO compressed RLE strings, as pycocotools' ``rleFrString`` reads them.

    A string is a sequence of numbers of 5-bit groups (``char - 48``; bit 0x20: more groups follow;
    bit 0x10 of the last group: negative); the runs from the third on are stored as the difference
    to the run two before. The strings must match ``_RLE_STRING``. Returns the run lengths (int64),
    the string of each run, and for each string whether it holds a number of over 7 groups (more
    than 32 bits: not from pycocotools; decoded from its first 7 groups).
    """
    chars = np.array([len(s) for s in strings], dtype=np.int64)
    groups = np.frombuffer(b"".join(strings), dtype=np.uint8) - np.uint8(48)
    ends = np.flatnonzero((groups & 0x20) == 0)  # the last group of each number
    starts = np.concatenate(([0], ends[:-1] + 1))
    width = ends - starts + 1
    values = np.zeros(len(ends), dtype=np.int64)
    for k in range(min(int(width.max()), 7)):
        has = np.flatnonzero(width > k)
        values[has] |= (groups[starts[has] + k] & 0x1F).astype(np.int64) << (5 * k)
    negative = (groups[ends] & 0x10) != 0
    values[negative] -= np.left_shift(np.int64(1), 5 * np.minimum(width[negative], 7))
    # Each string ends with the end of a number (``_RLE_STRING``): count the numbers per string.
    numbers = np.diff(np.searchsorted(ends, np.cumsum(chars) - 1, side="right"), prepend=0)
    string_of_run = np.repeat(np.arange(len(strings)), numbers)
    first = np.cumsum(numbers) - numbers
    j = np.arange(len(values)) - np.repeat(first, numbers)
    runs = values.copy()
    for parity, begin in ((1, 1), (0, 2)):  # runs j >= 3 add the run j - 2: two running sums
        chain = (j >= begin) & (j % 2 == parity)
        total = np.cumsum(np.where(chain, values, 0))
        before = np.where(first > 0, total[first - 1], 0)  # the sums of the strings before
        runs[chain] = (total - np.repeat(before, numbers))[chain]
    too_long = np.bincount(string_of_run[width > 7], minlength=len(strings)) > 0
    return runs, string_of_run, too_long
