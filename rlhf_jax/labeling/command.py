"""``rlhf-jax label``: make the items once, then serve the page (or print ``--stats``)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from rlhf_jax.atomic import write_jsonl
from rlhf_jax.config import Config, ConfigError
from rlhf_jax.labeling.storage import ITEMS_NAME, LabelStore, labels_dir, make_items, read_items, write_items

LOCAL_HOST = "127.0.0.1"


def items_from_file(path: pathlib.Path) -> list[tuple[str, list[str]]] | list[str]:
    """``(prompt, responses)`` pairs from a JSONL of ``{"prompt", "responses"}`` (extra
    fields such as ``ranks`` are ignored), or bare prompts from ``{"prompt"}`` records.
    Errors name the file and line."""
    from rlhf_jax.data import DataError, read_records

    rows = read_records(path, "prompts")  # every line a JSON object with a non-empty prompt
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with_responses = ["responses" in obj for obj in lines]
    if not any(with_responses):
        return [record["prompt"] for _, record in rows]
    if not all(with_responses):
        number = rows[with_responses.index(False)][0]
        raise DataError(f"{path}:{number}: no \"responses\" where other records have them; give either "
                        "prompts with responses to label, or bare prompts with --policy")
    return [(record["prompt"], record["responses"]) for _, record in read_records(path, "responses")]


def sample_items(cfg: Config, workdir: pathlib.Path, policy: str, prompts: list[str],
                 k: int) -> list[tuple[str, list[str]]]:
    """K responses per prompt from ``policy``, with the comparisons stage's sampling
    settings (``comparisons.sampling``, prompt length ``comparisons.prompts.max_len``)."""
    from rlhf_jax.generate import generate_from_export

    c = cfg.comparisons
    sampling_cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, sampling=c.sampling,
                                                                           prompts=c.prompts))
    repeated = [p for p in prompts for _ in range(k)]  # one sampler row per response: all K in one call
    out = generate_from_export(sampling_cfg, workdir, policy, repeated)
    if len(out) != len(repeated):
        raise RuntimeError(f"sampled {len(out)} responses for {len(repeated)} prompt rows")
    return [(p, [out[i * k + j][1] for j in range(k)]) for i, p in enumerate(prompts)]


def default_prompts(cfg: Config, workdir: pathlib.Path, n: int) -> list[str]:
    """The first ``n`` prompts of ``comparisons.prompts.train_path`` (the embedded task's by default)."""
    from rlhf_jax.data import read_records
    from rlhf_jax.stages import common

    env = common.make_env(cfg, workdir, "comparisons")
    path = env.data_path(cfg.comparisons.prompts.train_path, "comparisons.prompts.train_path")
    return [r["prompt"] for _, r in read_records(path, "prompts")[:n]]


def prepare_items(cfg: Config, workdir: pathlib.Path, prompts_file: str | None, policy: str | None,
                  k: int, n_prompts: int, overlap: int) -> list[dict[str, Any]]:
    """The items of ``labels/items.jsonl``, creating it on the first run (so a restart
    shows the same items, sampled or not)."""
    directory = labels_dir(workdir)
    if (directory / "items.jsonl").is_file():
        if prompts_file or policy:
            print(f"label: using the existing {directory / 'items.jsonl'}; --prompts/--policy apply only "
                  "when it does not exist yet")
        return read_items(directory)
    if not 2 <= k <= 9:
        raise ConfigError(f"--k {k}: a comparison has 2 to 9 responses")
    source = items_from_file(pathlib.Path(prompts_file)) if prompts_file else None
    if source and isinstance(source[0], tuple):
        if policy:
            raise ConfigError(f"--prompts {prompts_file} already holds responses; drop --policy or give bare prompts")
        pairs = source
    elif policy:
        prompts = source if source else default_prompts(cfg, workdir, n_prompts)
        pairs = sample_items(cfg, workdir, policy, list(prompts)[:n_prompts], k)
    else:
        raise ConfigError("label: give --prompts FILE with {\"prompt\", \"responses\"} records, or --policy EXPORT "
                          f"(e.g. run:sft/export) to sample --k responses per prompt; {directory} has no items.jsonl yet")
    items = make_items(pairs, overlap)
    write_items(directory, items)
    return items


def serve(workdir: pathlib.Path, items: list[dict[str, Any]], host: str | None, port: int,
          guidelines: str | None = None) -> None:
    """Serves until Ctrl-C (the caller holds the labels directory's lock). Labelers need a
    token unless the address is a loopback one (127.0.0.1, the default, or localhost); the
    lead's view always needs the lead's token. Both tokens are kept in the labels directory,
    so a restarted server prints the same addresses."""
    from rlhf_jax.labeling.access import is_loopback, load_tokens, make_server
    from rlhf_jax.labeling.guidelines import load_guidelines
    from rlhf_jax.labeling.server import LabelApp

    host = host or LOCAL_HOST
    directory = labels_dir(workdir)
    try:
        rules = load_guidelines(guidelines)
        store = LabelStore(directory)
        tokens = load_tokens(directory)
    except ValueError as err:
        raise ConfigError(f"label: {err}") from None
    token = None if is_loopback(host) else tokens["token"]
    app = LabelApp(store, items, token, tokens["admin_token"], rules)
    try:
        server = make_server(app, host, port)
    # the port is taken, or the address is not this machine's (werkzeug exits on a failed bind)
    except (OSError, SystemExit) as err:
        raise ConfigError(f"label: cannot listen on {host}:{port}; choose another --port "
                          "(0: any free one) or --host") from err
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{server.server_port}/"
    print(f"label: {len(items)} items ({sum(i['overlap'] for i in items)} shown to every labeler); "
          f"labels go to {directory}/<labeler>.jsonl; guidelines: {rules.source} (version {rules.version})")
    print(f"label: open {base}" + (f"?token={token}  (anyone with this address can label; keep it private)"
                                   if token else "  (this machine only; --host ADDRESS serves others, with a token)"))
    print(f"label: the lead's view: {base}admin?token={tokens['admin_token']}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


MERGED = pathlib.Path("merged") / "comparisons.jsonl"  # inside labels/: not a labeler's file


def merge_labels(workdir: pathlib.Path) -> pathlib.Path:
    """Writes every labeler's records into ``labels/merged/comparisons.jsonl`` (replaced
    whole) for ``rlhf-jax rm``: the overlap items once per labeler who ranked them, as the
    paper trained on every labeler's comparisons. Each file is validated as comparisons
    first, so a bad line is named in its own file."""
    from rlhf_jax.data import read_records

    directory = labels_dir(workdir)
    store = LabelStore(directory) if directory.is_dir() else None
    labelers = [name for name in store.labelers() if store.path(name).is_file()] if store else []
    if not labelers:
        raise ConfigError(f"label --merge: no labeler files in {directory}; nothing has been labeled in {workdir}")
    for name in labelers:
        read_records(store.path(name), "comparisons")  # validates, naming the file and line
    records = [record for name in labelers for record in store.records(name)]  # whole, with flags
    out = directory / MERGED
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, records)
    print(f"label --merge: {len(records)} comparisons from {len(labelers)} labelers ({', '.join(labelers)}) -> {out}")
    print(f"label --merge: train a reward model on them with\n  {rm_command(workdir)}")
    if len(records) < RM_BATCH:
        print(f"label --merge: that needs at least {RM_BATCH} comparisons (one batch); label more, or lower "
              "--rm.data.batch_size")
    return out


RM_BATCH = 8  # the README's rm command's batch: small label sets (tens of comparisons) still train


def rm_command(workdir: pathlib.Path) -> str:
    """The README's command for a reward model on the merged labels in ``workdir``: from the
    run's SFT export when it has one (the paper's RM starts from the SFT model), else from a
    fresh init."""
    from rlhf_jax.checkpoint import EXPORT_META

    command = (f"rlhf-jax rm --workdir {workdir} --rm.data.train_path=run:labels/{MERGED.as_posix()} "
               f"--rm.data.val_path=None --rm.data.batch_size={RM_BATCH}")
    return command if (workdir / "sft" / "export" / EXPORT_META).is_file() else command + " --rm.init_from=None"


def print_stats(workdir: pathlib.Path) -> dict[str, Any]:
    from rlhf_jax.labeling.stats import format_stats, label_stats

    directory = labels_dir(workdir)
    if not directory.is_dir():
        raise ConfigError(f"label --stats: {directory} does not exist; nothing has been labeled in {workdir}")
    items = read_items(directory) if (directory / ITEMS_NAME).is_file() else None
    stats = label_stats(LabelStore(directory), items)
    print(format_stats(stats))
    return stats
