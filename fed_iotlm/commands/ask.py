"""``fed-iotlm ask --run DIR --data DIR [--split test|val|train] --index I "question"``:
answer a question about one sample (one row of one split of an exchange-format dataset,
e.g. one ExtraSensory minute or one HAPT window) with a tuned stage run; say which class
the answer names, the sample's recorded label, and the sensors the answer used."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ask", help="ask the tuned LM about one sample", description=__doc__
    )
    parser.add_argument("question")
    parser.add_argument(
        "--run", type=Path, required=True, help="output directory of `fed-iotlm tune`"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="dataset directory in the exchange format"
    )
    parser.add_argument("--index", type=int, required=True, help="row of the split (from 0)")
    parser.add_argument(
        "--split", choices=("test", "val", "train"), default="test", help="which split file"
    )
    parser.add_argument(
        "--conditioning", default=None, help="prefix or adapter (default: the run's best)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_iotlm.data.exchange import load_meta, load_split
    from fed_iotlm.data.preprocess import featurize_split
    from fed_iotlm.llm.ask import Assistant

    try:
        meta = load_meta(args.data)
        split = featurize_split(load_split(args.data, meta, args.split), meta.modalities)
        answer = Assistant(args.run, args.conditioning).ask(split, args.index, args.question)
    except (ValueError, OSError, IndexError) as exc:
        print(f"fed-iotlm ask: error: {exc}", file=sys.stderr)
        return 2
    print(f"Q: {args.question}")
    print(f"A: {answer.text}")
    print(f"names: {answer.task} = {answer.label or '(no class of this task)'}")
    if answer.task in split.y:
        y = int(split.y[answer.task][args.index])
        recorded = meta.tasks[answer.task].classes[y] if y >= 0 else "(unlabelled)"
        print(f"recorded {answer.task} of {args.split} row {args.index}: {recorded}")
    print(f"sensors used: {', '.join(answer.sensors)} ({answer.conditioning} conditioning)")
    if answer.missing:
        print(f"sensors missing (masked, no token): {', '.join(answer.missing)}")
    return 0
