"""``rlhf-jax compile --config X --topology v5e:2x2 [--stages sft,dpo|pipeline] [--json F] [--a.b=v ...]``

Compiles, on this host's CPU, every program the stages run for a TPU topology (libtpu, the
``tpu`` extra, describes the slice), on the mesh the real launch makes, and prints each one's
bytes per chip against the chip's HBM beside the analytic estimate, its FLOPs and roofline
time. Exit 0 when everything fits, 3 (naming the program and its bytes) when not, 2 for a
bad config or topology.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from rlhf_jax.aot.stages import DEFAULT_STAGES, PIPELINE, STAGES, resolve
from rlhf_jax.config import ConfigError

EXIT_DOES_NOT_FIT = 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-jax compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment file defining get_config(); default: the embedded tiny config")
    p.add_argument("--topology", required=True,
                   help="v4-8, v5e-16, v5e-256, v5p-128, v6e-8, or a grid: v5e:2x2, v6e:4x4, v5p:2x4x4")
    p.add_argument("--slices", type=int, default=1, help="slices of that topology (multi-slice), default 1")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated, of {', '.join(STAGES)}, or {PIPELINE}: every stage `rlhf-jax pipeline` "
                        f"runs with the config's pipeline.methods (default: {','.join(DEFAULT_STAGES)})")
    p.add_argument("--jobs", type=int, default=1,
                   help="programs compiled at a time (each takes its own host memory; default 1)")
    p.add_argument("--json", help="also write the figures here as JSON")
    p.add_argument("--estimate-only", action="store_true",
                   help="print the analytic estimate of every program without compiling (seconds)")
    return p


def stages_of(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip().replace("-", "_") for s in text.split(",") if s.strip())  # best-of-n: best_of_n
    unknown = [s for s in stages if s not in (*STAGES, PIPELINE)]
    if unknown or not stages:
        raise ConfigError(f"--stages={text!r}: expected a comma-separated subset of {list(STAGES)}, "
                          f"or {PIPELINE!r}")
    return stages


def run(config: str | None, topology_name: str, slices: int, stages: tuple[str, ...], overrides: list[str],
        json_path: str | None = None, out=sys.stdout, estimate_only: bool = False, jobs: int = 1):
    """Compiles and reports; returns the :class:`~rlhf_jax.aot.check.Report` (None with
    ``estimate_only``: the estimates are printed, one JSON line a program)."""
    import jax

    # the host compiles on its CPU; libtpu must not take (or look for) a TPU of its own
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from rlhf_jax.aot.check import check, table, to_json
    from rlhf_jax.aot.topology import parse_topology
    from rlhf_jax.config import apply_overrides, load_experiment
    from rlhf_jax.default_config import default_config

    topology = parse_topology(topology_name, slices)
    cfg = apply_overrides(load_experiment(config) if config else default_config(), overrides)
    stages = resolve(stages, cfg)
    if estimate_only:
        from rlhf_jax.aot.check import estimates

        for program, e in estimates(cfg, topology, stages):
            print(json.dumps({"stage": program.stage, "program": program.name,
                              **{k: v for k, v in vars(e).items()}, "total": e.total}), file=out, flush=True)
        return None
    print(f"compiling {', '.join(stages)} of {cfg.name} for {topology.describe()}", file=out, flush=True)
    report = check(cfg, topology, stages, progress=lambda line: print(line, file=out, flush=True), jobs=jobs)
    print(table(report), file=out, flush=True)
    if json_path:
        pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(json_path).write_text(json.dumps(to_json(report), indent=2))
    return report


def main(argv: list[str]) -> int:
    args, overrides = parser().parse_known_args(argv)
    try:
        report = run(args.config, args.topology, args.slices, stages_of(args.stages), overrides, args.json,
                     estimate_only=args.estimate_only, jobs=args.jobs)
    except ConfigError as err:  # ShardingError and friends are ValueErrors naming the field
        print(f"rlhf-jax compile: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"rlhf-jax compile: error: {err}", file=sys.stderr)
        return 2
    if report is None:  # estimates only
        return 0
    hbm = report.topology.chip.hbm_bytes
    for c in report.too_big():
        why = f"; XLA:TPU refused it: {c.refused}" if c.refused else ""
        print(f"rlhf-jax compile: {c.stage}/{c.name} needs {c.total / 2 ** 30:.2f} GiB per chip "
              f"({c.total} bytes: arguments {c.arguments}, outputs {c.outputs - c.aliased}, temporaries "
              f"{c.temporaries}), more than a {report.topology.chip.name} chip's {hbm / 2 ** 30:.0f} GiB{why}",
              file=sys.stderr)
    return EXIT_DOES_NOT_FIT if report.too_big() else 0
