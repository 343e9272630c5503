"""Preemption inside a Slurm job: save the work done, exit, and let the job requeue itself.

The batch script (pipeline/launch/templates/slurm/job.sh.jinja) exports RLHF_PREEMPT_FLAG, a file path,
and asks Slurm for USR1 some minutes before the time limit (`--signal=B:USR1@<s>`). On USR1 it
creates that file, passes the signal on to a data stage's process, waits for the stage to exit,
and requeues the job when the stage exited with EXIT_CODE.

- A data stage (one process) stops at once: the handler raises `Preempted`, the ledger is closed
  on the way out (every outcome is already written), and the requeued job skips what is recorded.
- A training stage may run as many processes under `srun` + `accelerate launch`, which do not
  see the batch shell's signal; they look for the flag file instead. `trainer_callback()` checks
  it after every optimizer step, agrees with the other ranks (one all-reduce) so that all stop at
  the same step, saves a checkpoint and stops; the requeued job resumes from that checkpoint.

Outside a Slurm job (no RLHF_PREEMPT_FLAG) nothing here changes how a stage runs.
"""

from __future__ import annotations

import os
import signal

FLAG_ENV = "RLHF_PREEMPT_FLAG"
EXIT_CODE = 75  # EX_TEMPFAIL, "try again later": the batch script requeues the job on it

_requested = False


class Preempted(SystemExit):
    """The job was told to stop; its work so far is saved.

    A SystemExit, not a plain BaseException: stage code catching Exception (a failed request,
    say) cannot swallow it, and neither can asyncio. The USR1 handler raises it wherever the
    main thread is; when that is inside a task's step (an HTTP client's own task), asyncio keeps
    other BaseExceptions as that task's result and runs on, so the stage would finish as if
    nothing happened, but it re-raises SystemExit and KeyboardInterrupt out of the event loop."""


def active() -> bool:
    return bool(os.environ.get(FLAG_ENV))


def install(training: bool) -> None:
    """In a Slurm job: USR1 stops a data stage now, and raises the flag a training stage polls."""
    if not active():
        return

    def on_usr1(signum, frame):
        global _requested
        _requested = True
        if not training:
            raise Preempted("stopped by USR1 (time limit near, or preempted); the job requeues")

    signal.signal(signal.SIGUSR1, on_usr1)


def requested() -> bool:
    flag = os.environ.get(FLAG_ENV)
    return _requested or bool(flag and os.path.exists(flag))


def _on_any_rank(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def trainer_callback():
    """A transformers TrainerCallback: once stopping is requested (on any rank), save a checkpoint
    at the end of this step and stop training. `.stopped` tells whether it did."""
    from transformers import TrainerCallback

    class StopWhenPreempted(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if _on_any_rank(requested()):
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True
            return control

    return StopWhenPreempted()
