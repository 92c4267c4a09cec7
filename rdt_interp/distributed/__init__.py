"""Scale out over the GPUs of one node: data parallelism with ``torchrun`` and model parallelism
with accelerate. See docs/distributed.md.

* :mod:`~rdt_interp.distributed.context` -- rank, world size, device; barriers (torch.distributed)
* :mod:`~rdt_interp.distributed.plan` / :mod:`~rdt_interp.distributed.shards` -- deterministic
  shard plans, shard files in the run directory, compute-missing-then-merge steps
* :mod:`~rdt_interp.distributed.vla` / :mod:`~rdt_interp.distributed.capture` -- the VLA study's
  sweeps and specificity null, and captures, in shards (same results as one process)
* :mod:`~rdt_interp.distributed.placement` -- one model's layers over several devices
* :mod:`~rdt_interp.distributed.launch` / :mod:`~rdt_interp.distributed.worker` -- the
  ``torchrun`` command line and the per-rank entry point
"""
