"""Redaction: every occurrence of a secret value becomes ``[redacted:NAME]``.

Besides the raw value, the forms a provider or a library is likely to echo are redacted
too: URL-encoded (``quote``, ``quote_plus``, upper- and lower-case escapes), base64
(standard and URL-safe, padded and, for values of 8+ characters, unpadded), JSON-escaped,
and, for values of 12+ bytes, the part of a base64 text that encodes the value wherever it
sits inside a longer encoded string (e.g. ``Basic base64(user:secret)``). Values shorter
than 4 characters are redacted as well, at the price of redacting unrelated text that
happens to equal them.

The executor runs every connector result, receipt ``error``/``detail`` and ``reason``
through its redactor before anything keeps them; a logging filter and an excepthook run every
log record and any uncaught traceback through it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

#: values at least this long also get their unpadded base64 forms redacted
MIN_UNPADDED = 8
#: values at least this many bytes also get their in-stream base64 cores redacted
MIN_CORE = 12
_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def _lower_escapes(text: str) -> str:
    return _ESCAPE.sub(lambda m: m.group().lower(), text)


def _base64_cores(raw: bytes) -> set[str]:
    """The base64 characters that depend only on ``raw`` at each of the 3 alignments."""
    cores = set()
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + raw).decode("ascii")
            start = 4 if shift else 0  # the first group mixes prefix and value bits
            end = len(text) - 4  # the last group mixes with padding or whatever follows
            if end - start >= 8:
                cores.add(text[start:end])
    return cores


def forms(value: str) -> set[str]:
    """Every text form of ``value`` that is redacted."""
    raw = value.encode("utf-8")
    found = {value, quote(value, safe=""), quote(value), quote_plus(value)}
    found |= {_lower_escapes(f) for f in list(found)}
    found.add(json.dumps(value)[1:-1])
    found.add(json.dumps(value, ensure_ascii=False)[1:-1])
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode("ascii")
        found.add(text)
        if len(value) >= MIN_UNPADDED:
            found.add(text.rstrip("="))
    if len(raw) >= MIN_CORE:
        found |= _base64_cores(raw)
    found.discard("")
    return found


class Redactor:
    """Replaces secret values (and their encoded forms) with ``[redacted:NAME]``."""

    def __init__(self, secrets: Iterable[tuple[str, str]] = ()) -> None:
        labels: dict[str, str] = {}
        for name, value in secrets:
            if not value:
                continue
            for form in forms(value):
                labels.setdefault(form, name)
        self._labels = {form: self._label(name, labels) for form, name in labels.items()}
        self._pattern: re.Pattern[str] | None = None
        if self._labels:
            ordered = sorted(self._labels, key=len, reverse=True)  # longest match wins
            self._pattern = re.compile("|".join(re.escape(form) for form in ordered))

    @staticmethod
    def _label(name: str, labels: dict[str, str]) -> str:
        label = f"[redacted:{name}]"
        # a name that contains a secret value would bring the value back
        if any(form in label for form in labels):
            return "[redacted]"
        return label

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        """``text`` with every secret form replaced."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: self._labels[m.group()], text)

    def optional(self, text: str | None) -> str | None:
        """:meth:`text` for a value that may be None."""
        return None if text is None else self.text(text)

    def value(self, data: Any) -> Any:
        """Strings anywhere in ``data`` (dict keys and values, lists, tuples) redacted."""
        if self._pattern is None:
            return data
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, dict):
            return {self.value(k): self.value(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.value(v) for v in data]
        if isinstance(data, tuple):
            return tuple(self.value(v) for v in data)
        return data

    def found(self, text: str) -> bool:
        """Whether ``text`` contains a secret form (for checks and tests)."""
        return self._pattern is not None and self._pattern.search(text) is not None


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the message, its exception text and stack info."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        redact: Callable[[str], str] = self.redactor.text
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, redacted
            message = f"{record.msg} {record.args}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_filter(redactor: Redactor, logger: logging.Logger | None = None) -> None:
    """Redact every record that ``logger``'s (default: the root logger's) handlers emit.

    Filters on a handler see every record that reaches it, including records propagated
    from child loggers (a filter on a logger would see only its own records).
    """
    if not redactor:
        return
    target = logger or logging.getLogger()
    for handler in target.handlers:
        installed = [f for f in handler.filters if isinstance(f, RedactingFilter)]
        for existing in installed:
            existing.redactor = redactor
        if not installed:
            handler.addFilter(RedactingFilter(redactor))


def install_excepthook(redactor: Redactor) -> None:
    """Print uncaught exceptions (which logging never sees) with secret values redacted."""
    if not redactor:
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(redactor.text(text))

    sys.excepthook = hook
