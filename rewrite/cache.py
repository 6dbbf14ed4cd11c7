"""Where rewrite keeps what it converts once (real LLMs from GGUF, tokenised text): one root folder.

Example:
    >>> import os
    >>> from rewrite.cache import cache_dir
    >>> os.environ["REWRITE_CACHE"] = "/tmp/rewrite-cache"
    >>> str(cache_dir())
    '/tmp/rewrite-cache'
    >>> del os.environ["REWRITE_CACHE"]
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of rewrite's on-disk cache: `$REWRITE_CACHE` or `~/.cache/rewrite`."""
    return Path(os.environ.get("REWRITE_CACHE") or Path.home() / ".cache" / "rewrite")
