"""Ctrl-C for commands that spend minutes inside one XLA computation.

Python runs its SIGINT handler only when the main thread is back in the interpreter, and a JAX call that blocks on a
device (a prefill of a hundred conversations, a training step) can keep it away for minutes: Ctrl-C then seems to do
nothing. `signal.set_wakeup_fd` makes the C-level handler write the signal's number to a pipe at once; a watcher
thread reads it. The first Ctrl-C still takes the normal way (KeyboardInterrupt when the computation returns, so
records and checkpoints are closed cleanly) and says so at once; a second one ends the process at once (jaxlib's
own SIGINT handling may get there first).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130


def quit_on_second_interrupt(command: str) -> bool:
    """Install the watcher for `aloe-jax <command>`; False (nothing done) off the main thread or where something
    else (an asyncio loop) already owns the wakeup descriptor."""
    if threading.current_thread() is not threading.main_thread():
        return False
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1:
        signal.set_wakeup_fd(previous)  # owned by someone else: put nothing of ours in its way
        os.close(read_end)
        os.close(write_end)
        return False

    def watch() -> None:
        interrupts = 0
        while True:
            for signum in os.read(read_end, 64):
                if signum != signal.SIGINT:
                    continue
                interrupts += 1
                if interrupts == 1:
                    print(f"aloe-jax {command}: stopping when the running computation returns (finished work is "
                          f"kept); Ctrl-C again to quit now", file=sys.stderr, flush=True)
                else:
                    print(f"aloe-jax {command}: interrupted at once (what the last finished turn or checkpoint "
                          f"saved is kept; the rest is lost)", file=sys.stderr, flush=True)
                    os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=watch, daemon=True, name="aloe-interrupts").start()
    return True
