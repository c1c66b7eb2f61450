"""``fed-iotlm sites OUT [OVERRIDE ...]``: one dataset directory per node, for a deployment
rehearsal.

Writes ``OUT/site-<i>`` (the exchange format: ``meta.json``, ``train.npz``, ``test.npz``)
holding node i's share of the configured dataset with only its modalities, as the
simulation would give it.  Start SuperNode i with
``--node-config 'partition-id=i data-dir="OUT/site-i"'`` (docs/deploy.md); the
overrides are Hydra overrides of ``configs/`` and must match the run's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sites``."""
    parser = subparsers.add_parser(
        "sites",
        help="write each simulated node's data as its own site directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="directory to write site-<i>/ into")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. experiment=quick seed=1"
    )
    parser.add_argument("--force", action="store_true", help="replace existing site-<i>/")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export; a bad config or an existing target is a one-line error and exit status 2."""
    from hydra.errors import HydraException

    from fed_iotlm.federation.sites import export_sites
    from fed_iotlm.settings import compose

    try:
        sites = export_sites(compose(list(args.overrides)), args.out, force=args.force)
    except (ValueError, OSError, HydraException) as exc:
        print(f"fed-iotlm sites: error: {exc}", file=sys.stderr)
        return 2
    for s in sites:
        print(
            f"{s.path}  partition-id={s.partition_id}  modalities={','.join(s.modalities)}"
            f"  train={s.num_train} test={s.num_test}"
        )
    return 0
