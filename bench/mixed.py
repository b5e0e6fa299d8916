"""Mixed traffic: 98% hits over 2,000 warm keys and 2% fresh keys, ours vs cashews vs no cache.

The hits-only benchmark (``hit_throughput``) asks for one key again and again; a service's traffic
spreads over many keys and misses now and then. Here (issue 21), one uvicorn worker serves
``bench/_keyed_app.py`` (uvloop and httptools when installed, ``gc.collect(); gc.freeze()`` at the
end of start-up, as the example service does), 20 tenants x 100 items warm (a warm pass asks for
each key once, then one second of load unrecorded), and each request asks for a warm key chosen
uniformly at random, or with probability 2% a key never asked before (one miss and one fill).

Variants: ours with the near cache (the default), ours with ``CACHE_NEAR_CACHE=false`` (a server
of its own), the same handler uncached, and cashews ``client_side=True`` (its near cache). Each is
a ratio to the floor (pre-serialised bytes, same paths) measured right before and after it, in
paired rounds whose variant order rotates; figures are medians of the rounds. The near-cache share
is read from the server's own counters over ours' mixed runs. Misses only: every request a fresh
key, same variants beside the floor.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench._common import fmt_ratio_range, median, spread
from bench._traffic import KeyedServer, load_generator, near_share, paired

TENANTS, ITEMS = 20, 100
FRESH_SHARE = 0.02
#: Issue 21's targets: req/s over the floor's (and the near cache's share of ours' HITs).
MIXED_TARGET = 0.75
MISSES_TARGET = 0.35
NEAR_SHARE_TARGET = 0.90
LABELS = {
    "ours": "ours, near cache on",
    "ours-off": "ours, CACHE_NEAR_CACHE=false",
    "nocache": "the same handler, uncached",
    "cashews": "cashews client_side=True",
}


def _rounds(
    server: KeyedServer, variants: list[str], rounds: int, seconds: float, fresh_share: float
) -> dict[str, list[dict[str, Any]]]:
    """Paired rounds: the floor, each variant (order rotating), the floor again."""
    out: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    for index in range(rounds):
        shift = index % len(variants)
        order = variants[shift:] + variants[:shift]

        def run(variant: str) -> dict[str, float]:
            return server.load(variant, TENANTS, ITEMS, seconds=seconds, fresh_share=fresh_share)

        before = run("floor")
        measured = {variant: run(variant) for variant in order}
        after = run("floor")
        floor = {key: (before[key] + after[key]) / 2 for key in ("rps", "p99_ms")}
        for variant, result in measured.items():
            out[variant].append({**result, "floor": floor})
    return out


def _warm(server: KeyedServer, variants: list[str]) -> None:
    for variant in variants:
        server.load(variant, TENANTS, ITEMS, seconds=600, sweep=True)  # every key once: fills
        server.load(variant, TENANTS, ITEMS, seconds=1)  # and read back, unrecorded


def _figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "rps": median([row["rps"] for row in rows]),
        **spread(paired(rows, "rps")),
        "p99_ms": median([row["p99_ms"] for row in rows]),
        "p99_ratio": median(paired(rows, "p99_ms")),
    }


def run(quick: bool = False) -> dict[str, Any]:
    from commons.testing.redis_server import RedisServer

    seconds, rounds = (1.0, 1) if quick else (2.0, 7)
    mixed: dict[str, dict[str, float]] = {}
    misses: dict[str, dict[str, float]] = {}
    with RedisServer() as redis:
        with KeyedServer(redis.url) as server:
            variants = ["ours", "nocache", "cashews"]
            _warm(server, ["ours", "cashews"])
            before = server.hits()
            measured = _rounds(server, variants, rounds, seconds, FRESH_SHARE)
            share = near_share(before, server.hits())
            mixed.update({variant: _figures(rows) for variant, rows in measured.items()})
            mixed["ours"]["near_share"] = share
            measured = _rounds(server, variants, rounds, seconds, 1.0)
            misses.update({variant: _figures(rows) for variant, rows in measured.items()})
        with KeyedServer(redis.url, near=False) as server:
            _warm(server, ["ours"])
            before = server.hits()
            measured = _rounds(server, ["ours"], rounds, seconds, FRESH_SHARE)
            mixed["ours-off"] = _figures(measured["ours"])
            mixed["ours-off"]["near_share"] = near_share(before, server.hits())
    return summarize(mixed, misses, seconds=seconds, rounds=rounds)


def summarize(
    mixed: dict[str, dict[str, float]],
    misses: dict[str, dict[str, float]],
    *,
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """The result (table, notes, chart, data) of what :func:`run` measured."""
    rows: list[list[Any]] = []
    for traffic, figures in (("98% hits, 2% fresh", mixed), ("misses only", misses)):
        for variant in ("ours", "ours-off", "nocache", "cashews"):
            figure = figures.get(variant)
            if figure is None:
                continue
            share = figure.get("near_share")
            rows.append(
                [
                    traffic,
                    LABELS[variant],
                    f"{figure['rps']:,.0f}",
                    fmt_ratio_range(figure),
                    f"{figure['p99_ms']:.1f} ({figure['p99_ratio']:.1f}×)",
                    "—" if share is None else f"{share:.1%}",
                ]
            )
    problems = []
    ours = mixed["ours"]
    if ours["ratio"] < MIXED_TARGET:
        problems.append(f"mixed {ours['ratio']:.2f}× < {MIXED_TARGET}×")
    for other in ("cashews", "nocache"):
        if ours["ratio"] <= mixed[other]["ratio"]:
            problems.append(f"mixed not ahead of {LABELS[other]}")
    if ours["near_share"] < NEAR_SHARE_TARGET:
        problems.append(f"near-cache share {ours['near_share']:.0%} < {NEAR_SHARE_TARGET:.0%}")
    if misses["ours"]["ratio"] < MISSES_TARGET:
        problems.append(f"misses only {misses['ours']['ratio']:.2f}× < {MISSES_TARGET}×")
    notes = (
        f"One uvicorn worker (gc.freeze() at start-up), {TENANTS} tenants × {ITEMS} items warm, "
        f"keyed load by {load_generator()}, 16 connections, one request in flight on each; "
        f"each request's key chosen at random: a warm key, or with probability "
        f"{FRESH_SHARE:.0%} a fresh one (misses only: every key fresh). {rounds} paired "
        f"round(s) of {seconds:g} s per variant, the floor (same paths, pre-serialised bytes) "
        "right before and after; cells are medians of the rounds (req/s, ratio to the floor "
        "beside it with the lowest and highest round's in brackets, p99 and its ratio to the "
        "floor's). Near-cache share: the server's "
        "commons_cache_near_hits over commons_cache_hits during ours' mixed runs. Targets "
        f"(issue 21): mixed ≥ {MIXED_TARGET}× and ahead of cashews and of no cache, near-cache "
        f"share ≥ {NEAR_SHARE_TARGET:.0%}, misses only ≥ {MISSES_TARGET}×: "
        + ("all met." if not problems else "MISSED: " + "; ".join(problems) + ".")
    )
    order = ("ours", "ours-off", "nocache", "cashews")
    labels = [LABELS[v] for v in order]
    series = {
        "98% hits, 2% fresh": [mixed[v]["ratio"] for v in order],
        "misses only": [misses[v]["ratio"] if v in misses else float("nan") for v in order],
    }
    return {
        "name": "mixed",
        "title": "Mixed traffic: 98% hits over 2,000 keys, 2% fresh keys (req/s vs the floor)",
        "columns": ["traffic", "variant", "req/s", "vs floor", "p99 ms (vs floor)", "near share"],
        "rows": rows,
        "notes": notes,
        "chart": {"type": "bar", "labels": labels, "series": series, "unit": "× floor"},
        "data": {"mixed": mixed, "misses": misses},
        "runs": {"seconds": seconds, "rounds": rounds},
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
