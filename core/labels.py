"""The one rule for a label (a class name), used wherever a label comes in: the dataset routes (images, zip,
relabel), POST /feedback, `refit dataset add` and the class folders of a training dataset.

A label becomes a folder name when a snapshot is written out to train on, and a class name a person reads
and picks from in the console. So it must be a valid folder name on every file system we write to
(at most 255 bytes in UTF-8: NAME_MAX), and two labels that look the same must be the same label: a label
is stored in Unicode NFC, and characters that cannot be seen or that reorder text (zero-width, bidi
controls, byte-order marks, line separators, C0/C1 controls, private-use, unassigned) are refused rather
than silently dropped, so that `ants` and `ants` + U+200B can never be two classes.

This module imports nothing from the rest of training/, so core.data and core.datasets both use it.
"""
from __future__ import annotations

import unicodedata

MAX_CHARS = 100
MAX_BYTES = 255  # one path component on Linux file systems (ext4, xfs, tmpfs); core.data.NAME_MAX
# A label is a class folder when a snapshot is materialized: not a name the dataset reader gives a meaning of
# its own (train/, val/, macOS's resource folders); names starting with '.' are hidden folders there.
RESERVED = {"train", "val", "__MACOSX"}
# Cc controls (C0, DEL, C1 such as U+0085), Cf format characters (U+200B..U+200F, U+202A..U+202E,
# U+2066..U+2069, U+FEFF, ...), line and paragraph separators, surrogates, private use, unassigned.
REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format or bidi character",
                      "Zl": "a line separator", "Zp": "a paragraph separator", "Cs": "a lone surrogate",
                      "Co": "a private-use character", "Cn": "not an assigned character"}
# Default-ignorable code points of other categories (Unicode's DerivedCoreProperties): rendered as nothing,
# like U+200B. And the blank braille pattern, which renders as a space.
_INVISIBLE = [(0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2800, 0x2800),
              (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF)]
RULE = (f"a label is 1-{MAX_CHARS} characters and at most {MAX_BYTES} bytes in UTF-8, is stored in Unicode "
        "NFC, has no '/' or '\\', no control, invisible, bidi, line-separator, private-use or unassigned "
        "characters, no space other than U+0020, does not start with '.', and is not "
        f"{', '.join(sorted(RESERVED))}")


def label_problem(label) -> tuple[str | None, str]:
    """(why `label` is not allowed or None, the label as stored: trimmed of spaces at its ends, NFC)."""
    # Only ASCII spaces, tabs and newlines at the ends are trimmed (a form field's trailing newline); any other
    # character str.strip() would drop (U+0085, U+2028, U+00A0) is refused, not quietly removed.
    label = label.strip(" \t\r\n") if isinstance(label, str) else ""
    if not label:
        return "a label is required (the class name), e.g. label=bees", ""
    bad = next((c for c in label if _refused(c)), None)
    if bad is not None:  # before NFC, which could change what is reported
        return _refusal(label, _describe(bad)), label
    label = unicodedata.normalize("NFC", label)
    size = len(label.encode("utf-8"))
    if "/" in label or "\\" in label:
        return _refusal(label, "it contains '/' or '\\'"), label
    if len(label) > MAX_CHARS:
        return _refusal(label, f"it is {len(label)} characters, over {MAX_CHARS}"), label
    if size > MAX_BYTES:
        return _refusal(label, f"it is {size} bytes in UTF-8, over {MAX_BYTES} (a folder name's limit)"), label
    if label.startswith(".") or label in RESERVED:
        return _refusal(label, "it starts with '.' or is a reserved folder name"), label
    return None, label


def _refused(c: str) -> bool:
    cat = unicodedata.category(c)
    cp = ord(c)
    return (cat in REFUSED_CATEGORIES or (cat == "Zs" and c != " ")
            or any(lo <= cp <= hi for lo, hi in _INVISIBLE))


def _describe(c: str) -> str:
    cat = unicodedata.category(c)
    what = REFUSED_CATEGORIES.get(cat) or ("a space other than U+0020" if cat == "Zs" else "an invisible character")
    return f"it contains U+{ord(c):04X} {unicodedata.name(c, '(no name)')}, {what} (category {cat})"


def _refusal(label: str, why: str) -> str:
    return f"label {label[:80]!r} is not allowed: {why}; {RULE}"
