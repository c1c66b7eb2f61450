"""``fed-iotlm ask --run DIR --data DIR --index I "question"``: answer a question about
one sample with a tuned stage run, and list the sensors the answer used."""

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
    parser.add_argument("--index", type=int, required=True, help="sample row")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument(
        "--conditioning", default=None, help="prefix or adapter (default: the run's best)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_iotlm.data.exchange import load_dataset
    from fed_iotlm.data.preprocess import featurize_dataset
    from fed_iotlm.llm.ask import Assistant

    try:
        ds = featurize_dataset(load_dataset(args.data))
        answer = Assistant(args.run, args.conditioning).ask(
            getattr(ds, args.split), args.index, args.question
        )
    except (ValueError, OSError, IndexError) as exc:
        print(f"fed-iotlm ask: error: {exc}", file=sys.stderr)
        return 2
    print(f"Q: {args.question}")
    print(f"A: {answer.text}")
    print(f"sensors used: {', '.join(answer.sensors)} ({answer.conditioning} conditioning)")
    return 0
