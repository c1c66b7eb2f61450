"""The port registry of tests/ports.py: what pytest workers rely on to never start two
servers on one port."""

from __future__ import annotations

import json
import socket

import pytest

from tests.ports import LEASE_S, lease_port


def picks(*ports: int):
    """A kernel that offers ``ports`` in this order."""
    offered = iter(ports)
    return lambda: next(offered)


def test_a_leased_port_is_not_handed_out_again_while_its_lease_lasts(tmp_path):
    registry = tmp_path / "ports.json"
    first = lease_port(registry, pick=picks(40001), now=lambda: 1000.0)
    # another worker: the kernel offers the same port again, then another
    second = lease_port(registry, pick=picks(40001, 40002), now=lambda: 1001.0)
    assert (first, second) == (40001, 40002)
    assert set(json.loads(registry.read_text())) == {"40001", "40002"}
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_an_ended_lease_frees_its_port_and_leaves_the_registry(tmp_path):
    registry = tmp_path / "ports.json"
    lease_port(registry, pick=picks(40001), now=lambda: 0.0)
    later = LEASE_S + 1
    assert lease_port(registry, pick=picks(40001), now=lambda: later) == 40001
    assert json.loads(registry.read_text()) == {"40001": later + LEASE_S}


def test_a_kernel_offering_only_leased_ports_is_an_error_not_a_loop(tmp_path):
    registry = tmp_path / "ports.json"
    lease_port(registry, pick=picks(40001), now=lambda: 0.0)
    with pytest.raises(RuntimeError, match="no unleased free port"):
        lease_port(registry, pick=lambda: 40001, now=lambda: 1.0)


def test_an_unreadable_registry_is_named(tmp_path):
    registry = tmp_path / "ports.json"
    registry.write_text("[1, 2]")
    with pytest.raises(ValueError, match="ports.json: not a port registry"):
        lease_port(registry)


def test_the_real_kernel_port_is_free_to_bind(tmp_path):
    port = lease_port(tmp_path / "ports.json")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
