"""Domain labels: KEY=VALUE pairs a domain carries from host to host
(`pvmig domain create --label`), and the selectors a fleet's policies match them with.

The syntax is Kubernetes's, as KubeVirt's MigrationPolicy selects VMs by it: a key of at
most 63 characters (letters, digits, '-', '_', '.', and one optional '/'-separated
prefix), a value of at most 63 (letters, digits, '-', '_', '.'; empty allowed).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from pvmig import errors

_KEY = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?/)?"
                  r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
MAX_LABELS = 64


def check(labels: Mapping[str, str], what: str = "label") -> dict[str, str]:
    """The labels, as a plain dict, or InvalidArgument naming the first bad one."""
    if len(labels) > MAX_LABELS:
        raise errors.InvalidArgument(f"at most {MAX_LABELS} labels, not {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise errors.InvalidArgument(
                f"bad {what} key {key!r}: letters, digits, '-', '_', '.', at most 63, "
                "beginning and ending with a letter or digit (an optional 'prefix/')")
        if not isinstance(value, str) or not _VALUE.match(value):
            raise errors.InvalidArgument(
                f"bad {what} value {value!r} for {key!r}: letters, digits, '-', '_', '.', "
                "at most 63, beginning and ending with a letter or digit")
    return dict(labels)


def parse(pairs: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE strings (the CLI's --label, repeatable) as labels; a key given twice is
    refused rather than silently the last."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise errors.InvalidArgument(f"a label is KEY=VALUE, not {pair!r}")
        if key in out:
            raise errors.InvalidArgument(f"label {key!r} given twice")
        out[key] = value
    return check(out)


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every pair of the selector is among the labels (an empty selector matches all)."""
    return all(labels.get(k) == v for k, v in selector.items())
