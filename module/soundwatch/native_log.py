"""What the TFLite runtime prints itself, brought into logging.

LiteRT's C++ code writes ``INFO: Created TensorFlow Lite XNNPACK delegate
for CPU.`` straight to file descriptor 2 when the first interpreter of a
process is built; no environment variable or option silences it, and it
bypasses Python's logging (so it lands on the console as a bare line among
formatted ones). The runtime prints it once per process, so
:func:`litert_banner_to_log` builds that first interpreter itself, with fd 2
pointed at a temporary file, and then logs what was written: the known
banner at DEBUG, anything else (a real error from the runtime) at WARNING.
Nothing but native code runs while fd 2 is redirected (the model's own
Python logging comes later, in the real constructor), and later calls cost
nothing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

logger = logging.getLogger("soundwatch.litert")

_BANNERS = ("INFO: Created TensorFlow Lite XNNPACK delegate",)
_lock = threading.Lock()
_done = False


def litert_banner_to_log(model_path: Path) -> None:
    """Before the process's first interpreter: build one quietly and log what it printed.

    Call it before creating a :class:`~soundwatch.model.Classifier`. A model
    that cannot load is left for the real constructor to report (with its
    own error); only the runtime's printed lines are logged here.
    """
    global _done
    with _lock:
        if _done:
            return
        _done = True
        try:
            from soundwatch.model import ModelError, _interpreter_class

            interpreter_cls, _backend = _interpreter_class()
        except ModelError:
            return  # no runtime: the real constructor says so
        try:
            saved = _redirect_stderr()
        except OSError as e:  # no usable fd 2 (a daemon): leave it alone
            logger.debug("cannot capture the runtime's output: %s", e)
            return
        try:
            interpreter_cls(model_path=str(model_path), num_threads=1).allocate_tensors()
        except (ValueError, RuntimeError) as e:
            logger.debug("first interpreter failed (the model loader reports it): %s", e)
        finally:
            _log_lines(_restore_stderr(*saved))


def _redirect_stderr() -> tuple[int, IO[bytes], bool]:
    sys.stderr.flush()
    capture = tempfile.TemporaryFile()  # noqa: SIM115  # closed in _restore_stderr
    saved = os.dup(2)
    try:
        # A crash while fd 2 is redirected must still show its traceback.
        fault = faulthandler.is_enabled()
        if fault:
            faulthandler.enable(file=saved)
        os.dup2(capture.fileno(), 2)
    except OSError:
        os.close(saved)
        capture.close()
        raise
    return saved, capture, fault


def _restore_stderr(saved: int, capture: IO[bytes], fault: bool) -> str:
    try:
        os.dup2(saved, 2)
    finally:
        os.close(saved)
    if fault:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a stderr with no fd
            faulthandler.enable(file=sys.stderr)
    try:
        capture.seek(0)
        return capture.read().decode("utf-8", errors="replace")
    finally:
        capture.close()


def _log_lines(text: str) -> None:
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(_BANNERS):
            logger.debug("%s", line)
        else:
            logger.warning("%s", line)
