"""If-Match (RFC 9110, 13.1.1) on every route that honours it: a list of entity tags matches when any
of them is the current ETag; a weak or malformed tag matches nothing (412), never a 500."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Api
from tests.helpers import assert_problem

Change = Callable[[Api, bytes | str | None], httpx.Response]


def _host(api: Api, if_match: bytes | str | None) -> httpx.Response:
    headers = {**api.admin, **({"If-Match": if_match} if if_match is not None else {})}
    return api.client.patch("/v1/hosts/node-1", json={"labels": {"n": str(_next())}}, headers=headers)


def _quota(api: Api, if_match: bytes | str | None) -> httpx.Response:
    headers = {**api.admin, **({"If-Match": if_match} if if_match is not None else {})}
    return api.client.put("/v1/projects/p/quota", json={"vms": _next()}, headers=headers)


def _policy(api: Api, if_match: bytes | str | None) -> httpx.Response:
    headers = {**api.admin, **({"If-Match": if_match} if if_match is not None else {})}
    return api.client.put("/v1/policy", json={"max_td_builds_per_host": 1 + _next() % 50}, headers=headers)


_counter = [0]


def _next() -> int:
    """Each change sets a new value, so that each one is a change (and bumps the generation)."""
    _counter[0] += 1
    return _counter[0]


ROUTES = {"updateHost": _host, "setQuota": _quota, "setPolicy": _policy}


@pytest.fixture
def generation(api: Api) -> Callable[[str], int]:
    api.create_host("node-1")
    assert _quota(api, None).status_code == 200
    assert _policy(api, None).status_code == 200

    def current(route: str) -> int:
        path = {"updateHost": "/v1/hosts/node-1", "setQuota": "/v1/projects/p/quota", "setPolicy": "/v1/policy"}[route]
        r = api.client.get(path, headers=api.admin)
        assert r.status_code == 200, r.text
        assert r.json()["generation"] >= 1
        return int(r.json()["generation"])

    return current


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "template",
    ['"1", "{g}"', '"{g}", "1"', '"1","{g}"', ' "98" ,  "{g}" ', '"x", "{g}"', 'W/"1", "{g}"', '"{g}"', "{g}", "*"],
)
def test_a_list_holding_the_current_etag_matches(api: Api, generation: Callable[[str], int], route: str,
                                                 template: str) -> None:
    g = generation(route)
    r = ROUTES[route](api, template.format(g=g))
    assert r.status_code == 200, r.text
    assert generation(route) == g + 1


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "value",
    [
        b'"\xb2"', b"\xb2", b'"\xc2\xb2"', b'"\xd9\xa3"',  # superscript two, Arabic-Indic three: not ASCII digits
        b'"' + b"9" * 5000 + b'"', b"9" * 5000, b'"9223372036854775808"', b'"99999999999999999999"',
        b'"-1"', b'""', b'"1', b",", b"", b"garbage", b'"{g}" "1"', b'"{g}"x', b"{g}{g}", b'"0{g}"',
        b'W/"{g}"', b'"98", *', b'"{g}' + b" " * 3000 + b'"',
    ],
)
def test_no_current_etag_is_412_never_500(api: Api, generation: Callable[[str], int], route: str,
                                          value: bytes) -> None:
    g = generation(route)
    r = ROUTES[route](api, value.replace(b"{g}", str(g).encode()))
    body = assert_problem(r, 412, "precondition_failed")
    assert len(body["detail"]) < 300
    assert generation(route) == g
