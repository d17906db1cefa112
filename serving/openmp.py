"""How long torch's OpenMP threads spin before they sleep: set before torch is imported.

On Linux, torch's CPU kernels run on libgomp. After each parallel region, libgomp's helper
threads spin for ``GOMP_SPINCOUNT`` iterations (300 000 by default: several milliseconds on
the 2-core box) waiting for the next region, then sleep. Within one forward pass that is right:
regions follow each other within microseconds. Between forward passes it burns a core that the
event loop needs to receive and answer the batch's requests, and with several server processes
(``--workers``) the helpers of one spin on the cores the other needs. Measured on the 2-core box
(docs/benchmarks.md), benchmark CNN over gRPC, one process, req/s at 1 / 32 clients:

=========================  =============  ==========
``GOMP_SPINCOUNT``         1 client       32 clients
=========================  =============  ==========
300 000 (libgomp default)  68-69          414-434
30 000                     77-87          428-477
3 000 (kloop's default)    81-82          439-442
0 (sleep at once)          68             407-434
=========================  =============  ==========

and with ``--workers 2``, HTTP at 8 clients: 7 req/s with the default, 224 with 3 000.

libgomp reads the variable once, when it is loaded, so the server must have it in its
environment before ``import torch``. A server started without it starts itself over with it
set (``os.execve``: the same PID, the same command): ``python -m serving`` first thing, before
it imports torch (about 50 ms), ``kloop serve`` once its arguments are read (it has imported
torch by then: about a second). A value the user set, or ``OMP_WAIT_POLICY``, is left alone.
This module must not import torch.
"""

from __future__ import annotations

import os
import sys

from serving.workers import own_command  # no torch there either

SPIN_ENV = "GOMP_SPINCOUNT"
SPIN_DEFAULT = "3000"
_USER_SETTINGS = (SPIN_ENV, "OMP_WAIT_POLICY")


def applies() -> bool:
    """Whether the server should set the spin count: libgomp (Linux) and the user set none."""
    return sys.platform == "linux" and not any(k in os.environ for k in _USER_SETTINGS)


def restart_with_spin_count() -> None:
    """Replace this process by the same command with the spin count set, when it should be
    set and is not. Returns only when nothing needs doing."""
    if not applies():
        return
    env = dict(os.environ, **{SPIN_ENV: SPIN_DEFAULT})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, own_command(), env)
