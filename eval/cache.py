"""The cache of evaluation results: one JSON file per (model, item) under ``$ONESHOT_CACHE/eval``.

An item is one perplexity dataset or one task. Its key holds everything that changes the number: the
model's content fingerprint, the data's content fingerprint, seqlen, limit, dtype, device type, the library
versions and the version of the evaluation code (`EVAL_CODE`). A result is read back only when its stored
key equals the key asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from oneshot.models import cache_root
from oneshot.runfolder import atomic_write_text

__all__ = ["EVAL_CODE", "ResultCache"]

logger = logging.getLogger(__name__)

# Bump when the evaluation code changes a number (protocol, tokenisation, metrics): old entries then miss.
# 3: per-document task results, n-shot, task version, chance level; the perplexity data fingerprint
EVAL_CODE = "oneshot-eval-code/3"


class ResultCache:
    """Per-item results of one model (``fingerprint``) under ``$ONESHOT_CACHE/eval/<fingerprint>/``."""

    def __init__(self, fingerprint: str | None, enabled: bool) -> None:
        self.dir = cache_root() / "eval" / fingerprint if fingerprint and enabled else None

    def _path(self, key: dict[str, Any]) -> Path | None:
        if self.dir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.dir / f"{key['kind']}-{key['name'].replace('/', '_')[-40:]}-{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        same = data.get("key") == json.loads(json.dumps(key, default=str))
        result = data.get("result")
        return result if same and isinstance(result, dict) else None

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=2, default=str) + "\n")
        except OSError as exc:
            logger.warning("could not write the evaluation cache %s: %s", path, exc)
