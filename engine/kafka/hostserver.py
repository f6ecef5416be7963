"""Preloaded by the forkserver of the partition processes (engine.kafka.host), never
imported elsewhere: the forkserver ignores SIGINT and SIGTERM.

A Ctrl-C or a service manager signals the whole process group. A forkserver that dies
of it reads to its ProcessPoolExecutors as every partition process dead (their exit
status comes through it), and they kill the partition processes mid-close; the worker
alone handles the signal and closes them. The forkserver still ends with the worker
(its end of the forkserver's pipe closes), after the partition processes.
"""

from __future__ import annotations

import signal
import sys

if "multiprocessing.forkserver" in sys.modules and sys.argv[:1] == ["-c"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
