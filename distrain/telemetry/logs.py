"""Every rank writes its own log file (for post-mortems); only rank 0 talks to the console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "distrain"
FILE_ONLY = {"file_only": True}


def setup_logging(run_dir: Path, rank: int, console: bool) -> logging.Logger:
    """Log to ``run_dir/logs/rank{rank}.log`` on every rank, and to stderr on rank 0 (warnings only unless
    ``console``). A record logged with ``extra=FILE_ONLY`` (a traceback the console's one paragraph points to)
    goes to the file only."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_logging(logger)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_dir / f"rank{rank}.log")
    file_handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    if rank == 0:  # without console output, warnings still reach it: they are about this run's settings
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_ConsoleFormatter())
        stream.setLevel(logging.INFO if console else logging.WARNING)
        stream.addFilter(lambda record: not getattr(record, "file_only", False))
        logger.addHandler(stream)
    return logger


class _ConsoleFormatter(logging.Formatter):
    """``[distrain] message``, with ``warning:`` / ``error:`` in front of what is one."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[distrain] {level}{record.getMessage()}"


def close_logging(logger: logging.Logger) -> None:
    """Detach and close the logger's handlers (the log files stay)."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def console_warning(message: str) -> None:
    """A warning through the run's log; after the log is closed (the very end of a run), on stderr as the console
    shows it - never into logging's last-resort handler without its prefix."""
    logger = get_logger()
    if logger.handlers:
        logger.warning(message)
    else:
        print(_ConsoleFormatter().format(logging.makeLogRecord({"msg": message, "levelno": logging.WARNING,
                                                                 "levelname": "WARNING"})), file=sys.stderr)
