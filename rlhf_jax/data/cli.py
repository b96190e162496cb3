"""``rlhf-jax data convert --format NAME --out DIR INPUT...``: a public data set into our
JSONL (``OUT/<split>/{demonstrations,comparisons,prompts,text}.jsonl``), and
``rlhf-jax data task-conversations --out DIR``: the embedded task as chat conversations in
TRL's layout. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_jax.data.jsonl import DataError


def _parser() -> argparse.ArgumentParser:
    from rlhf_jax.data.public import FORMATS

    parser = argparse.ArgumentParser(prog="rlhf-jax data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="convert a public data set into demonstrations, comparisons and prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="formats:\n" + "\n".join(f"  {name:24} {fmt.layout}" for name, fmt in FORMATS.items()))
    convert.add_argument("inputs", nargs="+", metavar="INPUT",
                         help=".jsonl, .jsonl.gz, .json (JSON lines or an array), .parquet, or a directory of them")
    convert.add_argument("--format", required=True, choices=list(FORMATS), metavar="NAME",
                         help="the layout of the inputs (listed below)")
    convert.add_argument("--out", required=True, help="directory to write into (must be empty or new)")
    convert.add_argument("--overwrite", action="store_true",
                         help="write into a non-empty --out, replacing only the files this conversion writes")
    convert.add_argument("--split", help="put every record in this split (default: the record's or file's own)")
    convert.add_argument("--prompt-style", choices=("auto", "chat", "text"), default="auto",
                         help="auto: the set's own; chat: text prompts become conversations; "
                              "text: conversations become HH transcripts")
    convert.add_argument("--chosen-as-demonstrations", action="store_true",
                         help="also write each comparison's single best response as a demonstration")
    convert.add_argument("--score", choices=("aspects", "overall"), default="aspects",
                         help="ultrafeedback: rank by the mean aspect rating or by overall_score")
    task = commands.add_parser("task-conversations", help="the embedded task in TRL's conversational layout")
    task.add_argument("--out", required=True, help="directory to write into (must be empty or new)")
    task.add_argument("--overwrite", action="store_true", help="replace the task's files in a non-empty --out")
    task.add_argument("--seed", type=int, default=0, help="the task's seed (as the run config's `seed`)")
    for name, default in (("n-demonstrations", 2000), ("n-demonstrations-val", 200), ("n-prompts", 4000),
                          ("n-prompts-val", 200), ("n-comparisons", 2000), ("n-comparisons-val", 200)):
        task.add_argument(f"--{name}", type=int, default=default)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "convert":
            from rlhf_jax.data.public import convert, describe
            from rlhf_jax.data.public.output import Options

            options = Options(split=args.split, prompt_style=args.prompt_style,
                              chosen_as_demonstrations=args.chosen_as_demonstrations, score=args.score)
            summary = convert(args.format, args.inputs, args.out, options, overwrite=args.overwrite)
            print(describe(summary, args.out))
        else:
            from rlhf_jax.tasks.conversations import write_task_conversations

            paths = write_task_conversations(
                args.out, seed=args.seed, n_demonstrations=args.n_demonstrations,
                n_demonstrations_val=args.n_demonstrations_val, n_prompts=args.n_prompts,
                n_prompts_val=args.n_prompts_val, n_comparisons=args.n_comparisons,
                n_comparisons_val=args.n_comparisons_val, overwrite=args.overwrite)
            for name, path in paths.items():
                print(f"{name}: {path}")
    except (DataError, ValueError) as err:
        print(f"rlhf-jax data {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
