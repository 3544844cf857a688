"""/docs and /redoc work with no network: every asset they reference is local and served."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Api

# src=, href=, url: '...' and spec-url= in the page: whatever a browser would fetch.
REFERENCE = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|\burl:\s*'([^']+)'""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_reference_only_local_assets_the_server_serves(api: Api, page: str) -> None:
    r = api.client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "://" not in html, "the page names another origin (a CDN?)"
    refs = [a or b for a, b in REFERENCE.findall(html)]
    assert "/openapi.json" in refs
    assert any(ref.endswith(".js") for ref in refs), refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
        asset = api.client.get(ref)
        assert asset.status_code == 200, ref
        assert asset.content, ref


def test_swagger_ui_has_authorize_and_no_validator_badge(api: Api) -> None:
    html = api.client.get("/docs").text
    assert '"persistAuthorization": true' in html
    assert '"validatorUrl": null' in html  # else the badge sends the spec's URL to validator.swagger.io
    spec = api.client.get("/openapi.json").json()
    # Swagger UI shows its Authorize button for a declared security scheme.
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    bundle = api.client.get("/static-offline-docs/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith(("application/javascript", "text/javascript"))
