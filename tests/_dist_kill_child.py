"""Run by tests/test_distributed.py under torchrun --max-restarts 1: rank 1 SIGKILLs itself in the middle of
its share on the first attempt; torchrun restarts the group, which resumes from the chunks already written."""

import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distributed import make_attributor, make_data, train_data  # noqa: E402


class KillAfter:
    """The training batches; on rank 1's first attempt the process kills itself when batch ``at`` is due."""

    def __init__(self, batches, at):
        self.batches, self.at = batches, at

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        for i, b in enumerate(self.batches):
            if first and dist.get_rank() == 1 and i == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b


def main(out_dir):
    torch.set_num_threads(1)
    from gradsketch.linalg.distributed import init_from_env

    assert init_from_env("gloo")  # each attempt under its own store prefix: a restarted group never hangs
    att = make_attributor(f"{out_dir}/store")
    att.fit(KillAfter(train_data(), at=4), progress=False)
    top = att.topk(make_data(2, sizes=(5, 4)), k=4, progress=False)
    if dist.get_rank() == 0:
        torch.save({"top": tuple(top), "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))},
                   f"{out_dir}/killed.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
