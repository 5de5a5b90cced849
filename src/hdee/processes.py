"""Child processes that never outlive hdee: a worker asks Linux to SIGKILL it when the process
that started it dies, however that dies (SIGKILL included, where no cleanup code runs). Used by
the training runner's pool (runners/local.py) and the tokenizer pool of `prepare`
(data/packing.py). Standard library only: `hdee prepare` must not import torch.

Once the pool's workers are gone, multiprocessing's resource tracker (which `spawn` pools
start) sees its pipe close and exits too, so nothing is left behind.
"""

from __future__ import annotations

import os
import signal


def die_with_parent(parent_pid: int | None = None) -> None:
    """Call first thing in a worker process. Linux: PR_SET_PDEATHSIG(SIGKILL), so this process
    is killed when its parent dies; when `parent_pid` is given and the parent is already gone
    (it died before this call), exit now. Elsewhere this does nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # orphaned between the fork and the prctl above
