"""The service's log lines next to gunicorn's, on stderr, with the process id (workers differ)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    """Our log lines next to gunicorn's, on stderr, with the process id (workers differ)."""
    logger = logging.getLogger("bnserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S %z"
            )
        )
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
