"""Multi-host JAX: :func:`maybe_initialize` ties the processes of one run together.

Call it once per process, before anything touches a device (the CLI does, right after
the config is resolved). What it does depends on ``distributed.mode``:

- ``off``: nothing; every process is a run of its own.
- ``on``: ``jax.distributed.initialize(...)`` with the config's fields; fields left
  ``None`` come from the variables below or JAX's cluster detection (TPU, SLURM, Open MPI).
- ``auto`` (default): as ``on`` when the config names a coordinator or the environment says
  this is one process of several (:func:`detect`), else nothing.

Environment variables for clusters JAX does not detect (our convention; JAX itself reads
only the first and the last):

==========================  ==============================================================
``JAX_COORDINATOR_ADDRESS``  ``host:port`` of process 0 (the coordinator listens there)
``JAX_NUM_PROCESSES``        how many processes the run has
``JAX_PROCESS_ID``           this process's id, ``0 .. JAX_NUM_PROCESSES - 1``
``JAX_LOCAL_DEVICE_IDS``     optional: the local devices this process uses, e.g. ``0,1``
==========================  ==============================================================

Also detected: a TPU VM (a pod slice's workers find each other from the VM metadata),
GKE/multislice TPU variables (``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_COORDINATOR_ADDRESS``),
SLURM with ``SLURM_NTASKS`` > 1, and Open MPI's ``mpirun``.

On CPU, cross-process collectives go through gloo (``jax_cpu_collectives_implementation``,
the default in this JAX version; set here if someone turned it off), so two processes on
one machine over ``127.0.0.1`` are a real multi-host run.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from typing import Mapping

import jax

from rlhf_jax.config import ConfigError, DistributedConfig

logger = logging.getLogger(__name__)

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`maybe_initialize` found: ``source`` names why it initialised (``config``,
    ``env``, ``tpu``, ``slurm``, ``mpi``) or is ``None`` when it did not."""

    initialized: bool
    source: str | None
    process_index: int
    process_count: int


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise ConfigError(f"{ENV_ADDRESS} is set, so {name} must be too (see rlhf_jax/distributed.py)")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _count(value: str | None) -> int:
    """Entries of a comma-separated host list."""
    return len([h for h in (value or "").split(",") if h.strip()])


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu installed and TPU chips visible (a local check, no network)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None) -> str | None:
    """Which environment says this process is one of several, or ``None``.

    ``env`` defaults to ``os.environ``; ``on_tpu_vm`` to a look at the local devices.
    """
    env = os.environ if env is None else env
    if env.get(ENV_ADDRESS):
        return "env" if _int_var(env, ENV_NUM_PROCESSES) > 1 else None
    if _count(env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")) > 1:
        return "tpu"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    slurm = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
        return "mpi"
    if (_on_tpu_vm() if on_tpu_vm is None else on_tpu_vm) and "TPU_SKIP_MDS_QUERY" not in env:
        # A TPU VM's metadata lists the slice's workers; on a single-host VM JAX finds one
        # process, which is harmless.
        return "tpu"
    return None


def initialize_kwargs(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> dict:
    """The arguments for ``jax.distributed.initialize``: the config's fields, else our
    environment variables; what is still ``None`` JAX fills in by cluster detection."""
    env = os.environ if env is None else env
    kwargs = {"coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
              "process_id": cfg.process_id, "local_device_ids": None}
    if cfg.local_device_ids:
        try:
            kwargs["local_device_ids"] = [int(i) for i in cfg.local_device_ids.split(",")]
        except ValueError:
            raise ConfigError(f"distributed.local_device_ids={cfg.local_device_ids!r}: "
                              "expected comma-separated integers like '0,1,2,3'") from None
    if env.get(ENV_ADDRESS):
        kwargs["coordinator_address"] = kwargs["coordinator_address"] or env[ENV_ADDRESS]
        if kwargs["num_processes"] is None:
            kwargs["num_processes"] = _int_var(env, ENV_NUM_PROCESSES)
        if kwargs["process_id"] is None:
            kwargs["process_id"] = _int_var(env, ENV_PROCESS_ID)
    return kwargs


def maybe_initialize(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> DistributedInfo:
    """Initialises ``jax.distributed`` when ``cfg`` (or, for ``auto``, the environment) asks
    for it. Idempotent: a second call, or a call after someone else initialised, does nothing.

    Raises ``ConfigError`` when it should initialise but JAX is already in use in this process
    (the processes would silently train as separate runs) or the variables are inconsistent.
    """
    env = os.environ if env is None else env
    if cfg.mode not in ("auto", "on", "off"):
        raise ConfigError(f"distributed.mode={cfg.mode!r}: expected 'auto', 'on' or 'off'")
    if jax.distributed.is_initialized():
        return DistributedInfo(True, "already", jax.process_index(), jax.process_count())
    if cfg.mode == "off":
        return DistributedInfo(False, None, 0, 1)
    if cfg.mode == "on":
        source = "config"
    elif cfg.coordinator_address and (cfg.num_processes or 0) > 1:
        source = "config"
    else:
        source = detect(env)
        if source is None:
            return DistributedInfo(False, None, 0, 1)

    from jax._src import xla_bridge  # no public way to ask "has a backend been created?"

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            f"distributed.mode={cfg.mode!r} ({source}): jax.distributed must be initialised before "
            "JAX touches a device, but this process already has; call "
            "rlhf_jax.distributed.maybe_initialize first (or set --distributed.mode=off)")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = initialize_kwargs(cfg, env)
    logger.info("jax.distributed.initialize(%s) [%s]", kwargs, source)
    jax.distributed.initialize(**kwargs)
    return DistributedInfo(True, source, jax.process_index(), jax.process_count())
