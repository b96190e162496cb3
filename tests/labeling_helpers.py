"""Shared by the ``rlhf-jax label`` tests: items of the embedded task, submissions, servers."""

from __future__ import annotations

import contextlib
import json
import pathlib
import threading

import numpy as np
from werkzeug.test import Client

from rlhf_jax.labeling import FLAGS, LabelApp, LabelStore, make_server, read_items
from rlhf_jax.labeling.command import prepare_items

K = 4
ADMIN_TOKEN = "lead-token-0123456789"


def write_prompts_with_responses(path: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """``n`` task prompts with K responses each, of the quality a partly trained policy writes."""
    from rlhf_jax.tasks import generate_prompt, sample_responses

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        prompt = generate_prompt(rng)
        records.append({"prompt": prompt, "responses": sample_responses(prompt, K, rng)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_run_items(workdir: pathlib.Path, n: int = 6, overlap: int = 2):
    workdir.parent.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts_with_responses(workdir.parent / f"{workdir.name}_prompts.jsonl", n)
    return prepare_items(None, workdir, str(prompts), None, K, 100, overlap)


def app_client(workdir: pathlib.Path, token=None, admin_token=ADMIN_TOKEN) -> Client:
    """A test client of the app; without a token it answers loopback hosts only, so the
    client's base URL is 127.0.0.1."""
    directory = workdir / "labels"
    app = LabelApp(LabelStore(directory), read_items(directory), token, admin_token)
    return Client(app)


def submission(labeler, item_id, ranks=(0, 1, 2, 2), flagged=None, ratings=None, seconds=None):
    flags = {f: [False] * K for f in FLAGS}
    if flagged:
        flags[flagged] = [True] + [False] * (K - 1)
    body = {"labeler": labeler, "item_id": item_id, "ranks": list(ranks), "flags": flags,
            "ratings": list(ratings) if ratings is not None else [4] * K}
    if seconds is not None:
        body["seconds"] = seconds
    return body


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def serving(app, port: int = 0):
    """``app`` on a real threaded server (the CLI's) at 127.0.0.1; yields the server."""
    server = make_server(app, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def start_cli_server(workdir, *args):
    """``rlhf-jax label`` in a subprocess; returns (process, the labelers' address, the lead's)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", "label", "--workdir", str(workdir),
                                "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    address = None
    for line in process.stdout:
        if "label: open http" in line:
            address = line.split("open ", 1)[1].split()[0]
        elif "the lead's view: http" in line:
            return process, address, line.split("view: ", 1)[1].split()[0]
    process.wait()
    raise AssertionError(f"label exited with {process.returncode} before printing its addresses")
