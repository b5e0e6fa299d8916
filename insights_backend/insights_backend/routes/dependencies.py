"""Annotated dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from insights_backend.database import get_session

__all__ = ["Session"]

Session = Annotated[AsyncSession, Depends(get_session)]
