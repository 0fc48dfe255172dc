"""DICOM value representations → FHIR primitive types.

Each function returns ``None`` for a value it cannot convert faithfully, so the caller leaves
the element out rather than writing something the data does not say.

* DA ``YYYYMMDD`` (PS3.5 6.2; ACR-NEMA ``YYYY.MM.DD`` is accepted) → FHIR ``date``
  ``YYYY-MM-DD``.
* DA + TM ``HHMMSS.FFFFFF`` (``HH``, ``HHMM`` and ACR-NEMA ``HH:MM:SS`` accepted) + an offset →
  FHIR ``dateTime``. FHIR requires a time zone whenever a time is given (R4
  datatypes.html#dateTime), so the offset comes from Timezone Offset From UTC (0008,0201)
  or the site's zone; with neither, only the date is kept.
* Text (LO, SH, LT, PN components) → FHIR ``string``: trimmed, control characters removed
  (FHIR strings may not contain code points below 32 except tab, CR and LF), empty → None.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, tzinfo

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")  # + lone surrogates
_OTHER_SPACE = re.compile(r"[^\S \t\r\n]")  # e.g. NBSP, U+2028: not allowed by FHIR's regex
_DA = re.compile(r"([0-9]{4})\.?([0-9]{2})\.?([0-9]{2})")
_TM = re.compile(r"([0-9]{2})(?::?([0-9]{2})(?::?([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_OFFSET = re.compile(r"([+-])([0-9]{2}):?([0-9]{2})")


def clean_text(value: object) -> str | None:
    """A FHIR ``string`` from a DICOM text value, or None when nothing is left.

    Parameters
    ----------
    value
        A decoded DICOM text value (or None).

    Returns
    -------
    str or None
        The value without leading/trailing spaces (DICOM pads with spaces and NULs),
        without control characters other than tab, CR and LF (nor lone surrogates, which
        cannot be sent as UTF-8), and with other white space
        (no-break space, line separators) turned into plain spaces, as the FHIR ``string``
        pattern ``[ \\r\\n\\t\\S]+`` requires.
    """
    if value is None:
        return None
    text = _OTHER_SPACE.sub(" ", _CONTROL.sub("", str(value))).strip()
    return text or None


def split_multi(value: str | None) -> tuple[str, ...]:
    """Values of a multi-valued DICOM text attribute joined with ``\\`` (PS3.5 6.4)."""
    if not value:
        return ()
    return tuple(v for v in (clean_text(part) for part in value.split("\\")) if v)


def _date(value: str | None) -> date | None:
    if not value:
        return None
    match = _DA.fullmatch(value.strip())
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def fhir_date(value: str | None) -> str | None:
    """FHIR ``date`` (``YYYY-MM-DD``) from a DICOM DA, or None if it is not a real date."""
    day = _date(value)
    return None if day is None or day.year < 1 else day.isoformat()


def _time(value: str | None) -> tuple[int, int, int, str] | None:
    """(hour, minute, second, fraction digits) of a DICOM TM, or None when invalid."""
    if not value:
        return None
    match = _TM.fullmatch(value.strip())
    if match is None:
        return None
    hour, minute, second = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    return hour, minute, second, match[4] or ""


def parse_offset(value: str | None) -> timedelta | None:
    """Timezone Offset From UTC (0008,0201) ``+HHMM``/``-HHMM`` as a timedelta.

    Returns None for an absent or malformed value, or one outside -12:00..+14:00 (the range
    PS3.3 C.12.1.1.8 allows).
    """
    if not value:
        return None
    match = _OFFSET.fullmatch(value.strip())
    if match is None:
        return None
    hours, minutes = int(match[2]), int(match[3])
    if minutes > 59:
        return None
    offset = timedelta(hours=hours, minutes=minutes)
    if match[1] == "-":
        offset = -offset
    if not timedelta(hours=-12) <= offset <= timedelta(hours=14):
        return None
    return offset


def _format_offset(offset: timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def fhir_datetime(da: str | None, tm: str | None, *, offset: str | None = None,
                  default_timezone: tzinfo | None = None) -> str | None:
    """FHIR ``dateTime`` for a DICOM date and time pair.

    Parameters
    ----------
    da, tm
        The DA and TM values (e.g. Study Date/Time, Series Date/Time).
    offset
        Timezone Offset From UTC (0008,0201) of the data, which wins when valid.
    default_timezone
        The site's zone for data without an offset; its UTC offset at that local date and
        time is used (so daylight saving time is honoured by a ``zoneinfo`` zone).

    Returns
    -------
    str or None
        ``YYYY-MM-DDThh:mm:ss[.f]+hh:mm`` when date, time and an offset are known;
        ``YYYY-MM-DD`` when the time or the offset is missing or invalid; None without a
        valid date.
    """
    day = _date(da)
    if day is None or day.year < 1:
        return None
    parts = _time(tm)
    if parts is None:
        return day.isoformat()
    hour, minute, second, fraction = parts
    delta = parse_offset(offset)
    if delta is None and default_timezone is not None:
        local = datetime(day.year, day.month, day.day, hour, minute, second)
        delta = default_timezone.utcoffset(local)
    if delta is None:
        return day.isoformat()
    stamp = f"{day.isoformat()}T{hour:02d}:{minute:02d}:{second:02d}"
    if fraction:
        stamp += f".{fraction}"
    return stamp + _format_offset(delta)
