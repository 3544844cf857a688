"""The HTTP ceiling: the same VM body, validated by the same pydantic model, at a FastAPI endpoint
that does nothing else. Served by uvicorn exactly as ``tdx-service serve`` serves the real app."""

from __future__ import annotations

import uuid

from fastapi import FastAPI

from service.vms.schemas import VmCreate


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/vms", status_code=201)
    async def create_vm(body: VmCreate) -> dict[str, object]:
        return {"id": str(uuid.uuid4()), "name": body.name, "status": "scheduled"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        "bench.ceiling_app:create_app", factory=True, host="127.0.0.1", port=args.port,
        access_log=False, log_level="warning", proxy_headers=False,
    )
