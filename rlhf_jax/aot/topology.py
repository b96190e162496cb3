"""TPU slices described on a host without TPUs: the chip table and topology names.

``libtpu`` (the ``tpu`` extra) describes any slice through
``jax.experimental.topologies.get_topology_desc``; its devices can hold a ``Mesh`` and
programs compile for them (``rlhf_jax.aot.programs``), though nothing runs.

Names, as Cloud TPU spells them (and MaxText's ``accelerator_to_spec_map.py`` maps them):
``v4-N`` and ``v5p-N`` count TensorCores (two a chip, one "megacore" device per chip);
``v5e-N`` (``v5litepod-N``) and ``v6e-N`` count chips; ``<gen>:AxB[xC]`` gives the chip
grid itself (``v5e:2x2``, ``v6e:4x4``, ``v5p:2x4x4``). ``slices`` > 1 is a multi-slice run
over the data-centre network.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from rlhf_jax.config import ConfigError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's limits (vendor figures; ``source`` says where they are from)."""

    name: str
    device_kind: str  # jax's ``device.device_kind``
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    source: str


CHIPS = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# generation -> (libtpu's name, chip config, grid rank, TensorCores a name counts per chip)
_GENERATIONS = {"v4": ("v4", "megacore", 3, 2), "v5p": ("v5", "megacore", 3, 2),
                "v5e": ("v5e", "default", 2, 1), "v5litepod": ("v5e", "default", 2, 1),
                "v6e": ("v6e", "default", 2, 1)}
# chips -> grid, as Cloud TPU lays out its slices (MaxText's table)
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice (or several) of one generation: ``grid`` chips per slice."""

    name: str  # as the user wrote it
    generation: str  # v4, v5e, v5p, v6e
    grid: tuple[int, ...]
    slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS["v5e" if self.generation == "v5litepod" else self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.grid) * self.slices

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips a host holds along each axis: 4 (2x2) on multi-host slices; single-host
        slices of 1 or 8 chips (v5litepod-8, v6e-8) are one host."""
        grid3 = tuple(self.grid) + (1,) * (3 - len(self.grid))
        if math.prod(grid3) in (1, 8) and len(self.grid) == 2:
            return grid3
        return (min(2, grid3[0]), min(2, grid3[1]), 1)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.host_bounds)

    def describe(self) -> str:
        grid = "x".join(map(str, self.grid))
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return f"{self.name} ({self.generation} {grid}{slices}: {self.chips} chips, {self.hosts} hosts)"


def parse_topology(name: str, slices: int = 1) -> Topology:
    """``v4-8``, ``v5e-256``, ``v5p-128``, ``v5e:2x2``, ``v6e:4x4``, ``v5p:2x4x4`` -> Topology."""
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    known = ", ".join(sorted(_GENERATIONS))
    grid_match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
    count_match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    generation = (grid_match or count_match).group(1) if (grid_match or count_match) else None
    if generation not in _GENERATIONS:
        raise ConfigError(f"topology {name!r}: expected <generation>-<count> (v4-8, v5e-16, v5p-128, v6e-8) or "
                          f"<generation>:<grid> (v5e:2x2, v5p:2x4x4), generation one of {known}")
    _, _, rank, cores_per_chip = _GENERATIONS[generation]
    grids = _GRIDS_3D if rank == 3 else _GRIDS_2D
    if grid_match:
        grid = tuple(int(n) for n in grid_match.group(2).split("x"))
        if len(grid) != rank:
            raise ConfigError(f"topology {name!r}: a {generation} grid has {rank} dimensions")
    else:
        count = int(count_match.group(2))
        chips = count // cores_per_chip
        if count % cores_per_chip or chips not in grids:
            unit = "TensorCores (2 a chip)" if cores_per_chip == 2 else "chips"
            sizes = ", ".join(f"{generation}-{c * cores_per_chip}" for c in sorted(grids))
            raise ConfigError(f"topology {name!r}: {generation}-N counts {unit}; known slices: {sizes} "
                              f"(or give the grid, e.g. {generation}:{'x'.join(map(str, grids[max(grids)]))})")
        grid = grids[chips]
    return Topology(name=name, generation=generation, grid=grid, slices=slices)


def libtpu_available() -> bool:
    """Whether ``libtpu`` (the ``tpu`` extra) is installed: what describing a TPU needs."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
    """The slice's devices (described, not attached), in the order ``jax.devices()`` lists
    them on the real slice. Needs ``libtpu``; the host runs JAX on its CPU."""
    if not libtpu_available():
        raise ConfigError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
                          "(it also runs on a CPU-only host)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here: do not wait for one
    # libtpu takes a lock file so that one process owns the TPU; describing one owns nothing,
    # and another compile (or a test) may be describing one at the same time
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    libtpu_name, chip_config, _, _ = _GENERATIONS[topology.generation]
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{libtpu_name}:{'x'.join(map(str, topology.grid))}",
        chip_config_name=chip_config, chips_per_host_bounds=topology.host_bounds, num_slices=topology.slices)
    return list(description.devices)
