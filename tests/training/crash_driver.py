"""Test driver: sed_megatron.train in this process, SIGKILLed (with its whole process group) at
one point of the checkpoint save of one iteration.

    python tests/training/crash_driver.py PHASE ITERATION -- <sed_megatron.train arguments>

PHASE: write (the first tensor file of the save), finish (before the checkpoint's metadata is
written), tracker (the new tracker file is written but not yet in place). Run it in a process
session of its own (its group is killed); single process: RANK/WORLD_SIZE/MASTER_* in the env.
"""

import os
import signal
import sys


def main():
    phase, kill_at = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    import megatron.training.checkpointing as checkpointing
    import megatron.training.training as loop
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from sed_megatron.runtime import mcore

    armed = [False]

    def die():
        if armed[0]:
            os.killpg(0, signal.SIGKILL)

    real_save = checkpointing.save_checkpoint

    def save_checkpoint(iteration, *args, **kwargs):
        armed[0] = iteration == kill_at
        return real_save(iteration, *args, **kwargs)

    checkpointing.save_checkpoint = loop.save_checkpoint = save_checkpoint
    writer = filesystem_async.FileSystemWriterAsync
    if phase == "write":
        real_write = writer.write_preloaded_data

        def write_preloaded_data(*args, **kwargs):
            die()
            return real_write(*args, **kwargs)

        writer.write_preloaded_data = staticmethod(write_preloaded_data)
    elif phase == "finish":
        real_finish = writer.finish

        def finish(self, *args, **kwargs):
            die()
            return real_finish(self, *args, **kwargs)

        writer.finish = finish
    elif phase == "tracker":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # the tracker written beside its place, not yet renamed
            if os.path.basename(os.fspath(dst)) == mcore.TRACKER_FILE:
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise SystemExit(f"unknown phase {phase!r}")

    from sed_megatron.train import main as train

    train(argv)


if __name__ == "__main__":
    main()
