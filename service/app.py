"""create_app(): routers, error handlers, middleware, and the lifespan of one service process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service import __version__
from service.auth import TokenCache, hash_secret
from service.config import Settings, get_settings
from service.context import AppContext, get_context
from service.dashboard import router as dashboard_router
from service.db import Database, DbTimeouts, make_engine
from service.errors import DATABASE_RETRY_AFTER_S, install_error_handlers, problem_response
from service.events import PostgresListener, make_broadcaster, signal_committed_events, write_pending_events
from service.events import router as events_router
from service.fanout import StreamLimit
from service.hosts.router import batch_router as hosts_batch_router
from service.hosts.router import router as hosts_router
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, RequestLogMiddleware, UnhandledErrorMiddleware
from service.models import Host, Vm
from service.openapi import operation_id, problems, publish
from service.operations import runner as operations_runner
from service.operations.router import router as operations_router
from service.policy.router import router as policy_router
from service.policy.schemas import PolicyDefaults
from service.projects.router import router as projects_router
from service.ratelimit import RateLimiter
from service.routing import install_method_not_allowed
from service.scheduler import queue
from service.scheduler.engine import SchedulerConfig
from service.scheduler.router import router as scheduling_router
from service.scheduler.weighers import default_weighers
from service.signals import Signal
from service.tokens import router as tokens_router
from service.vms.router import router as vms_router
from service.vms.service import PlacementSettings
from service.whoami import router as whoami_router

log = logging.getLogger("tdx.app")


class Status(BaseModel):
    status: str


def db_timeouts(settings: Settings) -> DbTimeouts:
    return DbTimeouts(
        connect_s=settings.db_connect_timeout_s,
        pool_s=settings.db_pool_timeout_s,
        statement_s=settings.db_statement_timeout_s,
        sqlite_busy_s=settings.sqlite_busy_timeout_s,
    )


def build_context(settings: Settings, db: Database | None = None) -> AppContext:
    if db is None:
        db = Database(
            make_engine(
                settings.database_url,
                sqlite_synchronous=settings.sqlite_synchronous,
                pool_size=settings.db_pool_size,
                timeouts=db_timeouts(settings),
            )
        )
    placement = PlacementSettings(
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
        schedule_timeout_s=settings.schedule_timeout_s,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        policy_defaults=PolicyDefaults(
            max_td_builds_per_host=settings.max_td_builds_per_host,
            td_memory_overhead_mib=settings.td_memory_overhead_mib,
        ),
        scheduler=SchedulerConfig(
            policy=settings.placement_policy,
            weighers=default_weighers(settings.placement_policy, settings.tdx_affinity_multiplier),
            candidate_limit=settings.candidate_limit,
        ),
    )
    events_signal = Signal()
    metrics = Metrics()
    ctx = AppContext(
        settings=settings,
        db=db,
        token_cache=TokenCache(settings.token_cache_ttl_s),
        metrics=metrics,
        placement=placement,
        create_limiter=RateLimiter(settings.vm_create_rate_per_s, settings.vm_create_burst),
        admin_token_hash=hash_secret(settings.admin_token) if settings.admin_token else None,
        events_signal=events_signal,
        fanout=make_broadcaster(db, events_signal, metrics),
        stream_limit=StreamLimit(settings.max_streams_per_principal),
    )
    db.before_commit_hooks.append(write_pending_events)
    db.after_commit_hooks.append(lambda s: signal_committed_events(ctx, s))
    return ctx


def _update_gauges(ctx: AppContext, session: Session) -> None:
    m = ctx.metrics
    m.pending.set(session.scalar(select(func.count()).select_from(Vm).where(Vm.status == "pending")) or 0)
    m.hosts.clear()
    for state, count in session.execute(select(Host.tdx_state, func.count()).group_by(Host.tdx_state)):
        m.hosts.labels(tdx_state=state).set(count)
    total, used = session.execute(select(func.sum(Host.keyids_total), func.sum(Host.used_keyids))).one()
    m.keyids_total.set(total or 0)
    m.keyids_used.set(used or 0)


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    ctx = build_context(settings, db)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        ctx.events_signal.bind(loop)
        ctx.capacity_signal.bind(loop)
        listener: PostgresListener | None = None
        tasks: list[asyncio.Task[None]] = []
        if not ctx.db.is_sqlite:
            url = make_url(settings.database_url).set(drivername="postgresql")
            url = url.update_query_dict({"connect_timeout": str(max(2, round(settings.db_connect_timeout_s)))})
            listener = PostgresListener(ctx, url.render_as_string(hide_password=False))
            listener.start()
        if settings.run_background_tasks:
            tasks.append(
                asyncio.create_task(
                    queue.run_forever(
                        ctx.db, ctx.placement, ctx.capacity_signal, settings.queue_tick_s, ctx.rng, ctx.metrics
                    )
                )
            )
            tasks.append(
                asyncio.create_task(operations_runner.run_forever(ctx.db, ctx.capacity_signal, settings.queue_tick_s))
            )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await ctx.fanout.stop()
            if listener is not None:
                listener.stop()

    # /docs and /redoc from assets the fastapi-offline package ships (no CDN: they work offline);
    # no validator badge (it would send the spec's URL to validator.swagger.io).
    app = FastAPIOffline(
        title="tdx-control-plane",
        version=__version__,
        description=(
            "Schedules Intel TDX confidential VMs only onto hosts that opted in to TDX when "
            "kvm_intel was loaded (kvm_intel.tdx=1), as reported by each host's agent."
        ),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    install_method_not_allowed(app)
    app.include_router(tokens_router)
    app.include_router(hosts_batch_router)
    app.include_router(hosts_router)
    app.include_router(vms_router)
    app.include_router(projects_router)
    app.include_router(scheduling_router)
    app.include_router(events_router)
    app.include_router(dashboard_router)
    app.include_router(whoami_router)
    app.include_router(policy_router)
    app.include_router(operations_router)

    @app.get("/healthz", tags=["operations"], response_model=Status, summary="The process is up")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get(
        "/readyz",
        tags=["operations"],
        response_model=Status,
        responses=problems("database_unavailable"),
        summary="The database is reachable",
    )
    async def readyz(request: Request) -> Status | Response:
        c = get_context(request)
        try:
            await c.db.ready(c.settings.readyz_timeout_s)
        except Exception as exc:
            log.warning("readiness check failed: %r", exc)
            return problem_response(
                503, "database_unavailable", "the database is not reachable",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            )
        return Status(status="ready")

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **problems("database_unavailable"),
        },
        summary="Prometheus metrics (text exposition format)",
    )
    async def metrics(request: Request) -> Response:
        c = get_context(request)
        await c.db.run(lambda s: _update_gauges(c, s), write=False)
        return Response(generate_latest(c.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    publish(app)
    app.add_middleware(BodyLimitMiddleware)
    # Inside the request log (which then logs the 500 and gives it its X-Request-ID).
    app.add_middleware(UnhandledErrorMiddleware, handlers=app.exception_handlers)
    app.add_middleware(RequestLogMiddleware, metrics=ctx.metrics, enabled=settings.log_requests)
    return app
