"""Where a job's result may go: its `reply_to` topic, if the allow-list takes it, else nowhere but an error.

Sluice writes only to topics it is configured to write to. A job's `reply_to` header must fully
match `reply_topics` (a regular expression; by default the results topic and `<results_topic>.*`,
where `sluice label`/`sluice batch` put each run's own topic) and be a legal Kafka topic name. The
jobs, dead-letter and traces topics are never reply topics, whatever the pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class ReplyTopics:
    def __init__(self, pattern: str, results_topic: str, reserved: Iterable[str] = ()) -> None:
        """`pattern`: the allow-list (empty: the default above); `reserved`: topics never allowed."""
        self.pattern = pattern or default_pattern(results_topic)
        self._regex = re.compile(self.pattern)  # ConfigError comes from ServiceConfig's own check
        self._reserved = set(reserved) - {results_topic}

    def refusal(self, topic: str) -> str | None:
        """Why `topic` may not take a result; None when it may."""
        shown = topic if len(topic) <= 80 else f"{topic[:80]}... ({len(topic)} characters)"
        if not _LEGAL_TOPIC.fullmatch(topic) or topic in (".", ".."):
            return f"reply_to {shown!r} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"
        if topic in self._reserved or not self._regex.fullmatch(topic):
            return f"reply_to {shown!r} is not an allowed reply topic (reply_topics: {self.pattern})"
        return None


def default_pattern(results_topic: str) -> str:
    """The results topic itself, and any topic named `<results_topic>.<something>`."""
    return rf"{re.escape(results_topic)}(\..+)?"
