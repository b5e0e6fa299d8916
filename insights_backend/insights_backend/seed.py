"""Demo data for an empty database: three tenants, their users and configs, 50 insights each.

The data is generated from a fixed seed, so every fresh database holds the same rows and the
README's examples print the same answers everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from insights_backend.models import Insight, Tenant, TenantConfig, User

__all__ = ["DEMO_TENANTS", "INSIGHTS_PER_TENANT", "DemoTenant", "seed_demo_data"]

INSIGHTS_PER_TENANT = 50


@dataclass(frozen=True)
class DemoTenant:
    id: int
    name: str
    plan: str
    timezone: str
    currency: str
    features: tuple[str, ...]
    usernames: tuple[str, ...]


# "alice" exists in two tenants: /v1/users/me must tell them apart.
DEMO_TENANTS = (
    DemoTenant(
        1,
        "Acme Corp",
        "enterprise",
        "America/New_York",
        "USD",
        ("alerts", "forecasts"),
        ("alice", "bob"),
    ),
    DemoTenant(2, "Globex", "team", "Europe/Berlin", "EUR", ("alerts",), ("alice", "carol")),
    DemoTenant(3, "Initech", "free", "Asia/Tokyo", "JPY", (), ("dave",)),
)

_EPOCH = datetime(2024, 6, 1, 9, 0, 0)
_METRICS = ("revenue", "churn", "signups", "conversion", "support tickets", "page load time")
_MOVES = ("rose", "fell", "spiked", "dipped", "stayed flat")
_SEGMENTS = ("EMEA", "North America", "APAC", "self-serve", "enterprise accounts", "mobile")
_CATEGORIES = {
    "revenue": "growth",
    "churn": "retention",
    "signups": "growth",
    "conversion": "funnel",
    "support tickets": "operations",
    "page load time": "operations",
}


def _insights_for(tenant_id: int, rng: random.Random) -> list[Insight]:
    insights = []
    for number in range(INSIGHTS_PER_TENANT):
        metric, move, segment = rng.choice(_METRICS), rng.choice(_MOVES), rng.choice(_SEGMENTS)
        change = rng.randint(2, 40)
        insights.append(
            Insight(
                tenant_id=tenant_id,
                title=f"{metric.capitalize()} {move} {change}% in {segment}",
                summary=f"Week-over-week, {metric} in {segment} {move} by {change}% "
                f"compared with the previous four-week average.",
                category=_CATEGORIES[metric],
                impact=round(rng.uniform(0.0, 1.0), 2),
                created_at=_EPOCH - timedelta(hours=7 * number + tenant_id),
            )
        )
    return insights


async def seed_demo_data(session: AsyncSession) -> bool:
    """Fills an empty database with the demo data; returns False if it held tenants already."""
    if await session.scalar(select(func.count()).select_from(Tenant)):
        return False
    rng = random.Random(20240601)  # fixed: the same demo data in every fresh database
    for tenant in DEMO_TENANTS:
        session.add(Tenant(id=tenant.id, name=tenant.name, plan=tenant.plan, created_at=_EPOCH))
        session.add(
            TenantConfig(
                tenant_id=tenant.id,
                display_name=tenant.name,
                timezone=tenant.timezone,
                currency=tenant.currency,
                features=list(tenant.features),
                updated_at=_EPOCH,
            )
        )
        domain = tenant.name.split()[0].lower()
        session.add_all(
            User(
                tenant_id=tenant.id,
                username=username,
                email=f"{username}@{domain}.example",
                full_name=f"{username.capitalize()} of {tenant.name}",
            )
            for username in tenant.usernames
        )
        session.add_all(_insights_for(tenant.id, rng))
    await session.commit()
    return True
