"""Compile every program of a run for a TPU topology on this host, and hold each one's
per-chip memory against the chip's HBM: the figures XLA:TPU reports
(``compiled.memory_analysis()``, ``cost_analysis()``) beside the analytic estimate
(``rlhf_jax.aot.estimate``), and a roofline time from the chip table."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import re
import time
from typing import Any

import jax

from rlhf_jax import sharding
from rlhf_jax.aot.estimate import Estimate, device_bytes, estimate
from rlhf_jax.aot.programs import Program
from rlhf_jax.aot.stages import stage_programs
from rlhf_jax.aot.topology import Topology, topology_devices
from rlhf_jax.config import Config
from rlhf_jax.models.attention import compiling_for

GiB = 2 ** 30


@dataclasses.dataclass
class Compiled:
    """One program's compiled figures per chip (bytes; FLOPs and bytes accessed per step)."""

    stage: str
    name: str
    compile_s: float
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    flops: float  # XLA's count: a while loop's body once (the scan over layers too), no Pallas kernel
    bytes_accessed: float
    estimate: Estimate
    fused_attention: bool  # the program holds Pallas (Mosaic) kernels: splash attention
    refused: str = ""  # XLA:TPU's own refusal (its temporaries exceed the usable HBM), else ""

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass
class Report:
    topology: Topology
    mesh: dict[str, int]
    programs: list[Compiled]

    def roofline_s(self, c: Compiled) -> float:
        """max(FLOPs / peak, bytes accessed / bandwidth) per chip, FLOPs the larger of XLA's
        and the model's (per chip)."""
        chip = self.topology.chip
        flops = max(c.flops, c.estimate.flops / self.topology.chips)
        return max(flops / chip.peak_bf16_flops, c.bytes_accessed / chip.hbm_bandwidth)

    def too_big(self) -> list[Compiled]:
        return [c for c in self.programs if c.refused or c.total > self.topology.chip.hbm_bytes]


def _output_bytes(compiled, lowered, donates: bool, args: tuple) -> int:
    outs = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                        lowered.out_info, compiled.output_shardings)
    return max(device_bytes(outs) - (device_bytes(args[0]) if donates else 0), 0)


# XLA:TPU refuses to compile a program whose buffers exceed the chip's usable HBM, e.g.
# "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
# temporaries (19.24G) exceeds available HBM (15.75G)."
_OUT_OF_HBM = re.compile(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _refused(program: Program, mesh, lowered, message: str, seconds: float) -> Compiled:
    """The figures of a program XLA:TPU would not compile for lack of HBM: its arguments
    (from their shapes and shardings) and the temporaries the compiler said it needs."""
    found = _OUT_OF_HBM.search(message)
    temporaries = int(float(found.group(1)) * GiB) if found else 0
    arguments = device_bytes(program.args)
    return Compiled(stage=program.stage, name=program.name, compile_s=seconds, arguments=arguments, outputs=0,
                    aliased=0, temporaries=temporaries, code=0, flops=0.0, bytes_accessed=0.0,
                    estimate=estimate(program, mesh, 0), fused_attention="tpu_custom_call" in lowered.as_text(),
                    refused=message.splitlines()[0][:300])


def lower_program(program: Program, mesh):
    """``program`` traced and lowered for the devices of ``mesh`` (with the TPU's attention)."""
    with sharding.activate(mesh), compiling_for("tpu"):
        return program.jitted.lower(*program.args)


def compile_program(program: Program, mesh, lowered=None) -> Compiled:
    """Compiles ``program`` (``lowered``, or lowered here) for the devices of ``mesh``."""
    start = time.perf_counter()
    lowered = lowered if lowered is not None else lower_program(program, mesh)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return _refused(program, mesh, lowered, str(err), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return Compiled(stage=program.stage, name=program.name, compile_s=seconds,
                    arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                    aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                    code=memory.generated_code_size_in_bytes, flops=float(cost.get("flops", 0.0)),
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                    fused_attention="tpu_custom_call" in compiled.as_text(),
                    estimate=estimate(program, mesh, _output_bytes(compiled, lowered, program.donates,
                                                                   program.args)))


def check(cfg: Config, topology: Topology, stages: tuple[str, ...], progress=None, jobs: int = 1) -> Report:
    """Compiles the programs of ``stages`` for ``topology`` on the mesh ``cfg.mesh`` makes
    of its devices (as the real launch does from ``jax.devices()``), ``jobs`` at a time
    (XLA compiles outside Python's lock; each holds its own host memory). Programs that lower
    to the same module (two methods' held-out evaluation, PPO's and PPO-ptx's sampler) are
    compiled once and reported under each name."""
    say = progress or (lambda line: None)
    mesh = sharding.make_mesh(cfg.mesh, devices=topology_devices(topology))
    programs = stage_programs(cfg, stages, mesh)  # outside the mesh: small eager ops run on this CPU
    lowered = [lower_program(program, mesh) for program in programs]  # tracing holds Python's lock: in turn
    modules = [hashlib.sha256(module.as_text().encode()).hexdigest() for module in lowered]
    first = {}
    for program, module, lowering in zip(programs, modules, lowered):
        first.setdefault(module, (program, lowering))

    def compile_one(program: Program, lowering) -> Compiled:
        say(f"compiling {program.stage}/{program.name} ...")
        result = compile_program(program, mesh, lowering)
        say(f"  {program.stage}/{program.name}: {result.compile_s:.1f} s, {result.total / GiB:.2f} GiB per chip")
        return result

    with concurrent.futures.ThreadPoolExecutor(max(jobs, 1)) as pool:
        compiled = {module: pool.submit(compile_one, *first_one) for module, first_one in first.items()}
        results = []
        for program, module in zip(programs, modules):
            result = compiled[module].result()
            if program is not first[module][0]:  # the same module: its figures, no second compile
                say(f"  {program.stage}/{program.name}: the same program as {result.stage}/{result.name}")
                result = dataclasses.replace(result, stage=program.stage, name=program.name, compile_s=0.0)
            results.append(result)
    return Report(topology=topology, mesh=dict(mesh.shape), programs=results)


def estimates(cfg: Config, topology: Topology, stages: tuple[str, ...]) -> list[tuple[Program, Estimate]]:
    """The analytic figure of every program, without compiling (seconds, not minutes)."""
    mesh = sharding.make_mesh(cfg.mesh, devices=topology_devices(topology))
    out = []
    for program in stage_programs(cfg, stages, mesh):
        with sharding.activate(mesh), compiling_for("tpu"):
            outputs = jax.eval_shape(program.jitted, *program.args)
        donated = device_bytes(program.args[0]) if program.donates else 0
        out.append((program, estimate(program, mesh, max(device_bytes(outputs) - donated, 0))))
    return out


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}" if n >= GiB / 100 else f"{n / GiB:.1e}"


def table(report: Report) -> str:
    """Markdown: each program's compiled bytes per chip beside the estimate, and its roofline."""
    chip = report.topology.chip
    lines = [f"{report.topology.describe()}, mesh {report.mesh}; {chip.name}: {_gib(chip.hbm_bytes)} GiB HBM, "
             f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s ({chip.source})",
             "",
             "GiB per chip; attention: splash (Pallas kernel) or XLA's",
             "",
             "| program | args | out | temp | total | est. total | est./compiled | est.: params / opt / grads / "
             "gathered weights / activations / cache / largest transient | attention | model / XLA TFLOP | "
             "roofline ms | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report.programs:
        e = c.estimate
        parts = " / ".join(_gib(x) for x in (e.params, e.optimizer, e.gradients, e.weights, e.activations, e.cache,
                                             e.transient))
        lines.append(f"| {c.stage}/{c.name} | {_gib(c.arguments)} | {_gib(c.outputs - c.aliased)} | "
                     f"{_gib(c.temporaries)} | {_gib(c.total)} | {_gib(e.total)} | {e.total / max(c.total, 1):.2f} | "
                     f"{parts} ({e.transient_what}) | {'splash' if c.fused_attention else 'XLA'} | "
                     f"{e.flops / report.topology.chips / 1e12:.3g} / {c.flops / 1e12:.3g} | "
                     f"{1e3 * report.roofline_s(c):.3g} | "
                     f"{'**NO**' if c in report.too_big() else 'yes'} |")
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    chip = report.topology.chip
    return {
        "topology": {**dataclasses.asdict(report.topology), "chips": report.topology.chips,
                     "hosts": report.topology.hosts},
        "chip": dataclasses.asdict(chip), "mesh": report.mesh,
        "programs": [{"stage": c.stage, "program": c.name, "compile_s": round(c.compile_s, 2),
                      "bytes_per_chip": {"arguments": c.arguments, "outputs": c.outputs, "aliased": c.aliased,
                                         "temporaries": c.temporaries, "code": c.code, "total": c.total},
                      "estimate": {**dataclasses.asdict(c.estimate), "total": c.estimate.total},
                      "xla_flops_per_chip": c.flops, "bytes_accessed_per_chip": c.bytes_accessed,
                      "fused_attention": c.fused_attention, "refused_by_xla": c.refused,
                      "roofline_s": report.roofline_s(c), "fits": c not in report.too_big()}
                     for c in report.programs]}
