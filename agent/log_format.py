"""Log lines that a message cannot forge.

Whoever may publish controls ids, URLs and bodies, and a program's stderr often
repeats what it was fed: a newline in any of them, logged as is, would start a
line that looks like the agent's own. Control characters in a record's message
are escaped; a traceback (``exc_info``) is the code's own and stays as it is.
"""

from __future__ import annotations

import logging
import re
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the format
# characters that hide text or reorder it on a terminal (zero-width, bidi overrides).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), m.group().encode(
        "unicode_escape").decode("ascii")), text)


class OneLineFormatter(logging.Formatter):
    """Formats each record's message on one line, control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr, one line per record, for the agent, the archiver and the manager."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level,
                        handlers=[handler])
    # pika logs every reconnect attempt at ERROR with a traceback; ours say it once.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
