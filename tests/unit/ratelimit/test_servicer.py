"""Request validation helpers of the servicer (the RPCs themselves are tested through gRPC)."""

from __future__ import annotations

from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2

from libs.errors import Violations
from services.ratelimit.limits import Subject
from services.ratelimit.servicer import subject_from_proto


def parse(org: str = "o1", team: str = "t1", key: str = "k1", ip: str = "") -> tuple[Subject, list[str]]:
    v = Violations()
    msg = ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id=org, team_id=team, key_id=key), client_ip=ip)
    subject = subject_from_proto(msg, v)
    return subject, [f.field for f in v.items]


def test_client_ip_is_normalised() -> None:
    assert parse(ip="::ffff:10.0.0.1")[0].client_ip == "10.0.0.1"
    assert parse(ip="2001:db8:0:0::1")[0].client_ip == "2001:db8::1"
    assert parse(ip="")[0].client_ip == ""
    assert parse(ip="10.0.0.256")[1] == ["subject.client_ip"]


def test_ids_are_required_bounded_and_printable() -> None:
    assert parse(org="", key="")[1] == ["subject.principal.org_id", "subject.principal.key_id"]
    assert parse(team="t" * 257)[1] == ["subject.principal.team_id"]
    assert parse(key="a b")[1] == ["subject.principal.key_id"]
    assert parse(key="k\x00")[1] == ["subject.principal.key_id"]
    assert parse() == (Subject("o1", "t1", "k1"), [])
