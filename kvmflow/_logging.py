"""The library's loggers: silent below warning unless the application configures logging.

structlog, never configured, prints every line (debug included) to **stdout**, which would
corrupt the output of any program that embeds kvmflow and writes data there. So every
kvmflow logger decides at each call where its line goes:

- once the application has configured structlog (``structlog.is_configured()``; the kvmflow
  command line does), through that configuration, as any structlog logger;
- until then, to the standard :mod:`logging` module under the logger's name
  (``kvmflow.migration``, ...), which drops what is below its level: warnings and errors
  reach stderr by default, and an application that configures :mod:`logging` gets what it
  asked for.

The library itself never configures either.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

#: What a line becomes on its way to the standard library: dropped early when its level is
#: off, then rendered as ``event key=value ...``.
_STDLIB_PROCESSORS: list[structlog.typing.Processor] = [
    structlog.stdlib.filter_by_level,
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
]


class LibraryLogger:
    """A structlog-style logger (``bind``, ``debug`` ... ``exception``) that follows the
    application's logging configuration, whenever it is made (see the module)."""

    __slots__ = ("_context", "_name", "_stdlib")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}
        self._stdlib: Any = None

    def bind(self, **values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, {**self._context, **values})

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger(self._name, **self._context)
        if self._stdlib is None:
            self._stdlib = structlog.wrap_logger(
                logging.getLogger(self._name),
                processors=_STDLIB_PROCESSORS,
                wrapper_class=structlog.stdlib.BoundLogger,
                **self._context,
            )
        return self._stdlib

    def debug(self, event: str, **values: Any) -> None:
        self._target().debug(event, **values)

    def info(self, event: str, **values: Any) -> None:
        self._target().info(event, **values)

    def warning(self, event: str, **values: Any) -> None:
        self._target().warning(event, **values)

    def error(self, event: str, **values: Any) -> None:
        self._target().error(event, **values)

    def exception(self, event: str, **values: Any) -> None:
        self._target().exception(event, **values)

    def critical(self, event: str, **values: Any) -> None:
        self._target().critical(event, **values)


def get_logger(name: str) -> LibraryLogger:
    """The logger of one part of kvmflow (``kvmflow.monitor``, ``kvmflow.migration``, ...)."""
    return LibraryLogger(name)
