"""Beyond one device: data parallelism under torchrun / accelerate (``distributed``), FSDP2 sharding
(``sharding``) and generation by a colocated vLLM engine (``vllm``). The single-device path stays the
reference every test compares against."""

from lmgym.agents.scale.distributed import DataParallel, DistributedError, launcher_world

__all__ = ["DataParallel", "DistributedError", "launcher_world"]
