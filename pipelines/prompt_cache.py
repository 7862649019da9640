"""An LRU of prompt embeddings, bounded in bytes, so repeated prompts skip the text encoders.

Keys are (model variant id, prompt, kind): the variant id names everything that changes the
embeddings (model, quantization of the text encoders, dtype, device); kind tells a positive
prompt from a negative one. Values are the tensors the pipeline's `encode_prompt` returned,
stored as they are (no copy), so a cached run is bit-identical to an uncached one. Callers
must treat them as read-only.

Hand-written rather than functools.lru_cache or cachetools: the bound is in bytes of tensor
storage, not in entries, and the hit/miss/byte counters are exported to /metrics.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CacheKey = tuple[str, str, str]
Embeddings = tuple["torch.Tensor", ...]


def tensor_bytes(value: Embeddings) -> int:
    """Bytes of storage held by the tensors (what keeping them in the cache costs)."""
    return sum(t.numel() * t.element_size() for t in value)


class PromptCache:
    """LRU of prompt embeddings, bounded in bytes, keyed by (model variant id, prompt, kind).

    `hits`, `misses`, `evictions` and `bytes` are plain counters for /metrics. An entry larger
    than `max_bytes` is returned but not kept; `max_bytes=0` turns caching off.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, tuple[Embeddings, int]] = OrderedDict()
        # The engine reads the counters from another thread than the one that fills the cache.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey) -> Embeddings | None:
        """The cached embeddings (counted as a hit) or None (counted as a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: CacheKey, value: Embeddings) -> None:
        size = tensor_bytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1

    def get_or_encode(self, key: CacheKey, encode: Callable[[], Embeddings]) -> Embeddings:
        """The cached embeddings, or `encode()`'s result, which is then cached."""
        value = self.get(key)
        if value is None:
            value = encode()
            self.put(key, value)
        return value

    def drop_variant(self, variant_id: str) -> int:
        """Forget a variant's entries (its model was unloaded: they hold its device memory)."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == variant_id]
            for k in keys:
                self.bytes -= self._entries.pop(k)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "bytes": self.bytes,
                "entries": len(self._entries),
                "max_bytes": self.max_bytes,
            }
