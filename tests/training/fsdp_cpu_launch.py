"""`accelerate launch ... tests/training/fsdp_cpu_launch.py ARGS`: `ms_llava.training` with the launcher's FSDP plugin
kept on CPU processes (gloo), for tests/training/test_distributed.py.

accelerate 1.15 enables FSDP only for accelerator process types (MULTI_GPU, MULTI_XPU, ...): on a machine without a GPU
the processes are MULTI_CPU and the FSDP plugin built from configs/accelerate/fsdp.yaml is dropped without a word, so
the run is plain DDP. This shim sets the type back to FSDP after accelerate has built its state; everything else (the
plugin from the shipped config, FSDP2's fully_shard, the FULL_STATE_DICT save) is accelerate's and torch's own code.
"""

import atexit
import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:
        self.fsdp_plugin = fsdp_plugin
    # the state is shared and initialised again later (without the plugin argument): keep FSDP every time
    if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if not getattr(AcceleratorState, "_fsdp_kept_said", False):
            AcceleratorState._fsdp_kept_said = True
            print(f"fsdp_cpu_launch: FSDP kept on CPU process {self.process_index}", file=sys.stderr, flush=True)


AcceleratorState.__init__ = _init_keeping_fsdp

if os.environ.get("FSDP_CPU_LAUNCH_COUNT_CHECKPOINTS"):
    # Counts the layer calls that transformers' activation checkpointing runs through its checkpoint function, and
    # says how many at exit: the test's evidence that `--gradient-checkpointing` checkpointed anything.
    from transformers import PreTrainedModel

    _set_gradient_checkpointing = PreTrainedModel._set_gradient_checkpointing
    _checkpointed_calls = []

    def _counting_set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None, **kwargs):
        if gradient_checkpointing_func is None:
            return _set_gradient_checkpointing(self, enable, **kwargs)

        def counting(*args, **inner_kwargs):
            _checkpointed_calls.append(1)
            return gradient_checkpointing_func(*args, **inner_kwargs)

        return _set_gradient_checkpointing(self, enable, counting, **kwargs)

    PreTrainedModel._set_gradient_checkpointing = _counting_set_gradient_checkpointing
    atexit.register(
        lambda: print(f"fsdp_cpu_launch: {len(_checkpointed_calls)} checkpointed layer calls", file=sys.stderr)
    )

if __name__ == "__main__":
    from ms_llava_cli import run_as_module  # what `python -m ms_llava.training` runs

    sys.exit(run_as_module("train"))
