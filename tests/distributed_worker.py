"""One process of a multi-process run for ``test_distributed.py``: runs CLI commands in turn
(``rlhf_jax.cli.main``, so ``maybe_initialize`` joins the processes from the environment).

Usage: ``python distributed_worker.py EXPERIMENT WORKDIR COMMAND [COMMAND ...]``, with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``XLA_FLAGS`` set
by the caller. Prints ``process P of N: ok`` at the end.
"""

import sys


def main(experiment: str, workdir: str, *commands: str) -> None:
    import jax

    from rlhf_jax.cli import main as cli_main

    for command in commands:
        rc = cli_main([command, "--config", experiment, "--workdir", workdir])
        if rc != 0:
            raise SystemExit(f"rlhf-jax {command} exited {rc}")
    print(f"process {jax.process_index()} of {jax.process_count()}: ok "
          f"({jax.local_device_count()} local devices)", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
