"""The database: an async SQLAlchemy engine, its sessions, and start-up set-up.

:func:`open_database` is used in the lifespan: it creates the tables, seeds the demo data into an
empty database, and disposes of the engine when the service stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from insights_backend.models import Base
from insights_backend.seed import seed_demo_data

__all__ = ["Database", "get_session", "open_database"]


@dataclass(frozen=True)
class Database:
    """The engine and the session factory of one running service."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    async def answers(self) -> bool:
        """True when the database runs a trivial query."""
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:  # any driver error means "not answering" for the health check
            return False
        return True


@asynccontextmanager
async def open_database(url: str) -> AsyncIterator[Database]:
    """Connects, creates missing tables, seeds an empty database, and disposes on exit."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as session:
            await seed_demo_data(session)
        yield Database(engine, sessions)
    finally:
        await engine.dispose()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: a session of the running service's database for one request."""
    database: Database = request.app.state.database
    async with database.sessions() as session:
        yield session
