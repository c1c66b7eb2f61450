"""``fed-iotlm certs DIR``: TLS certificates and SuperNode keys for a deployed federation.

Writes ``ca.pem``/``ca.key`` (a private CA), ``superlink.pem``/``superlink.key`` (the
SuperLink's TLS certificate for ``--host`` names/IPs) and ``sites/<site>.key``/``.pub``
(one EC P-384 key pair per site, OpenSSH format, for ``--enable-supernode-auth``).
Private keys get mode 0600.  Existing files are never replaced without ``--force``.
See docs/deploy.md for how each file is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``certs``."""
    from fed_iotlm.federation.certs import DEFAULT_HOSTS

    parser = subparsers.add_parser(
        "certs",
        help="generate a CA, the SuperLink TLS certificate and per-site SuperNode keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, help="directory to write into (created if missing)")
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="DNS name or IP address the sites dial (repeatable; default: "
        + ", ".join(DEFAULT_HOSTS)
        + ")",
    )
    sites = parser.add_mutually_exclusive_group()
    sites.add_argument(
        "--site",
        action="append",
        dest="site_names",
        metavar="NAME",
        help="a site to make a key pair for (repeatable)",
    )
    sites.add_argument(
        "--sites",
        type=int,
        default=3,
        metavar="N",
        help="make key pairs for site-0 .. site-N-1 (default: 3; 0 for none)",
    )
    parser.add_argument(
        "--sites-only",
        action="store_true",
        help="only the site key pairs (e.g. on the site itself, or for a site added later)",
    )
    parser.add_argument(
        "--days", type=int, default=825, help="validity of the server certificate (default 825)"
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.set_defaults(func=run)


def site_names(args: argparse.Namespace) -> list[str]:
    if args.site_names:
        return list(args.site_names)
    if args.sites < 0:
        raise ValueError(f"--sites must be >= 0, got {args.sites}")
    return [f"site-{i}" for i in range(args.sites)]


def run(args: argparse.Namespace) -> int:
    """Generate; a bad option or an existing file is a one-line error and exit status 2."""
    from fed_iotlm.federation.certs import DEFAULT_HOSTS, generate

    try:
        sites = site_names(args)
        if args.sites_only and not sites:
            raise ValueError("--sites-only needs --site NAME or --sites N > 0")
        if args.sites_only and args.hosts:
            raise ValueError("--host names the server certificate; --sites-only makes none")
        if args.days < 1:
            raise ValueError(f"--days must be >= 1, got {args.days}")
        written = generate(
            args.dir,
            hosts=args.hosts or DEFAULT_HOSTS,
            sites=sites,
            tls=not args.sites_only,
            days=args.days,
            force=args.force,
        )
    except (ValueError, OSError) as exc:  # ExistingFilesError is an OSError
        print(f"fed-iotlm certs: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
