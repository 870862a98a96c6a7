"""Logging of every ``recstack`` process: one format, and third-party loggers that report
normal operation at INFO in words a user reads as failures kept to what matters."""

from __future__ import annotations

import logging

# FAISS's loader tries its CPU-specific builds first (AVX512-SPR, AVX512, AVX2) and logs
# each miss at INFO as a ModuleNotFoundError before it loads the generic build, which is
# what a pip wheel without them serves with. A real failure still shows: the generic
# build's ImportError propagates, and the loader's own problems are logged at ERROR.
FAISS_LOADER = "faiss.loader"
# Feast logs this at INFO whenever one of its calls reads the registry with the cache
# bypassed (its getters' default, used inside its apply and materialize: ~40 times in
# one `recstack train`), not when a cache expires (cache_ttl_seconds 0 never expires).
# recstack's own reads use the cache (exporters/feast_ops.py feature_store); this drops
# only that message of Feast's internal reads. "Registry file modified" and every other
# record of the logger stay.
FEAST_REGISTRY = "feast.infra.registry.registry"
FEAST_REREAD = "Registry cache expired, so refreshing"


class _DropMessage(logging.Filter):
    """Drops records whose message is exactly ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def configure(verbose: bool = False) -> None:
    """Root logging at INFO (DEBUG with ``verbose``, which also keeps the quieted records)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if verbose:
        return
    logging.getLogger(FAISS_LOADER).setLevel(logging.WARNING)
    registry = logging.getLogger(FEAST_REGISTRY)
    if not any(isinstance(f, _DropMessage) for f in registry.filters):
        registry.addFilter(_DropMessage(FEAST_REREAD))
