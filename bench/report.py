"""Summaries, target verdicts and the Markdown/JSON result files of a benchmark run."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (name, scenario, required ratio imageproxy/nginx of requests per second)
RATIO_TARGETS = (("small", 0.08), ("medium", 0.30), ("large", 0.50))
SLOW_HELD_KIB = 64.0
SLOW_GROWTH_MIB = 30.0
CROWD_RSS_MIB = 200.0
MANY_ORIGINS_WITHIN = 0.15


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarise(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Median/min/max of every numeric figure per scenario and proxy, then the target verdicts.

    Runs that were skipped or raised are left out; runs flagged invalid (errors, missing
    responses) are kept in the figures but counted, and a target with invalid runs fails.
    """
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in data["runs"]:
        if "skipped" in run or "error" in run:
            continue
        grouped.setdefault(run["scenario"], {}).setdefault(run["proxy"], []).append(run)
    summary: dict[str, Any] = {}
    for scenario, by_proxy in grouped.items():
        for proxy, runs in by_proxy.items():
            # Every numeric key of any run, in first-seen order (a figure may be missing, None,
            # in some runs: a failed scrape).
            keys = list(dict.fromkeys(
                k for r in runs for k, v in r.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "rep"))
            entry: dict[str, Any] = {
                k: _stats([r[k] for r in runs if r.get(k) is not None])
                for k in keys if any(r.get(k) is not None for r in runs)
            }
            entry["runs"] = len(runs)
            entry["invalid_runs"] = sum(1 for r in runs if not r.get("valid", True))
            summary.setdefault(scenario, {})[proxy] = entry
    return summary, _targets(summary, data)


def _get(summary: dict[str, Any], scenario: str, proxy: str, key: str,
         stat: str = "median") -> float | None:
    value = summary.get(scenario, {}).get(proxy, {}).get(key)
    return None if value is None else value[stat]


def _invalid(summary: dict[str, Any], scenario: str, *proxies: str) -> int:
    return sum(summary.get(scenario, {}).get(p, {}).get("invalid_runs", 0) for p in proxies)


def _verdict(ok: bool, invalid: int) -> bool:
    return ok and invalid == 0


def _targets(summary: dict[str, Any], data: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, required: str, measured: str, verdict: bool | None) -> None:
        targets.append({"name": name, "required": required, "measured": measured,
                        "pass": verdict})

    for scenario, need in RATIO_TARGETS:
        ip = _get(summary, scenario, "imageproxy", "rps")
        ng = _get(summary, scenario, "nginx", "rps")
        if ip is None or not ng:
            add(f"{scenario}: req/s vs nginx", f">= {need:.2f}", "not measured", None)
            continue
        bad = _invalid(summary, scenario, "imageproxy", "nginx")
        add(f"{scenario}: req/s vs nginx", f">= {need:.2f}",
            f"{ip / ng:.3f} ({ip:.0f} / {ng:.0f} req/s)"
            + (f", {bad} invalid runs" if bad else ""),
            _verdict(ip / ng >= need, bad))

    held = _get(summary, "slow-clients", "imageproxy", "held_per_client_kib")
    if held is None:
        add("slow clients: data held per client", f"< {SLOW_HELD_KIB:.0f} KiB", "not measured",
            None)
        add("slow clients: RSS growth", f"< {SLOW_GROWTH_MIB:.0f} MiB", "not measured", None)
    else:
        bad = _invalid(summary, "slow-clients", "imageproxy")
        pulled = _get(summary, "slow-clients", "imageproxy", "pulled_per_client_kib")
        worst = _get(summary, "slow-clients", "imageproxy", "held_per_client_kib", "max")
        add("slow clients: data held per client", f"< {SLOW_HELD_KIB:.0f} KiB",
            f"{held:.1f} KiB (worst {worst:.1f}; pulled {pulled:.0f} KiB/client)"
            + (f", {bad} invalid runs" if bad else ""),
            _verdict(held < SLOW_HELD_KIB, bad))
        growth = _get(summary, "slow-clients", "imageproxy", "rss_growth_mib")
        assert growth is not None
        add("slow clients: RSS growth", f"< {SLOW_GROWTH_MIB:.0f} MiB", f"{growth:.1f} MiB",
            _verdict(growth < SLOW_GROWTH_MIB, bad))

    wanted = data["settings"]["crowd"]
    served_min = _get(summary, "connections", "imageproxy", "served", "min")
    if served_min is None:
        add(f"connections: {wanted} all served", "all", "not measured", None)
        add("connections: peak RSS", f"< {CROWD_RSS_MIB:.0f} MiB", "not measured", None)
    else:
        connected_min = _get(summary, "connections", "imageproxy", "connected", "min") or 0
        add(f"connections: {wanted} all served", "all",
            f"{served_min:.0f} served, {connected_min:.0f} connected (worst run)",
            served_min >= wanted and connected_min >= wanted)
        peak = _get(summary, "connections", "imageproxy", "peak_rss_mib")
        per = _get(summary, "connections", "imageproxy", "rss_per_conn_kib")
        assert peak is not None and per is not None
        add("connections: peak RSS", f"< {CROWD_RSS_MIB:.0f} MiB",
            f"{peak:.0f} MiB ({per:.1f} KiB per idle connection)", peak < CROWD_RSS_MIB)

    many = _get(summary, "many-origins", "imageproxy", "rps")
    small = _get(summary, "small", "imageproxy", "rps")
    if many is None or not small:
        add("many origins vs small", f">= {1 - MANY_ORIGINS_WITHIN:.2f}", "not measured", None)
    else:
        bad = _invalid(summary, "many-origins", "imageproxy")
        add("many origins vs small", f">= {1 - MANY_ORIGINS_WITHIN:.2f}",
            f"{many / small:.3f} ({many:.0f} / {small:.0f} req/s)",
            _verdict(many / small >= 1 - MANY_ORIGINS_WITHIN, bad))

    on, off = (_get(summary, "zipf", mode, "rps") for mode in ("cache-on", "cache-off"))
    if on is not None and off:
        hit = _get(summary, "zipf", "cache-on", "hit_ratio")
        add("zipf: req/s, cache on vs off", "(reported)",
            f"{on / off:.2f}x ({on:.0f} / {off:.0f} req/s)"
            + (f", hit ratio {hit:.3f}" if hit is not None else ", hit ratio unknown"), None)

    workers = data["settings"]["workers"]
    multi = _get(summary, f"small-workers{workers}", "imageproxy", "rps")
    if multi is not None and small:
        add(f"multi-core: --workers {workers}, no pinning", "(reported)",
            f"{multi / small:.2f}x one pinned worker ({multi:.0f} req/s)", None)
    return targets


# --------------------------------------------------------------------------------------------


def _fmt(entry: dict[str, Any] | None, key: str, digits: int = 1, scale: float = 1.0) -> str:
    if not entry or key not in entry:
        return "–"
    s = entry[key]
    if s["n"] == 1:
        return f"{s['median'] * scale:.{digits}f}"
    return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–"
            f"{s['max'] * scale:.{digits}f})")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def markdown(data: dict[str, Any]) -> str:
    """The human-readable report."""
    s, summary, m = data["settings"], data["summary"], data["machine"]
    lines = [f"# imageproxy benchmark — {data['date']}", ""]
    if data.get("incomplete"):
        lines += [f"**INCOMPLETE: {data['incomplete']}**", ""]
    pin = data["pinning"]
    pinning = (f"proxies pinned to CPU {','.join(map(str, pin['proxy_cpus']))}, load generator "
               f"and origin on CPU {','.join(map(str, pin['load_cpus']))}"
               if pin["proxy_cpus"] else "no pinning (one CPU)")
    lines += [
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}; {pinning}.",
        f"- Software: Python {m['python']}, Twisted {m['twisted']}, {m['nginx']}, "
        f"load generator {m['wrk'] if data['loadgen'] == 'wrk' else 'Python (wrk missing)'}; "
        f"imageproxy commit {m['commit'] or 'unknown'}.",
        f"- Method: {s['reps']} repetition(s) of {s['duration']} s per scenario and proxy, nginx "
        f"and imageproxy in alternation; figures are medians (min–max); latency percentiles "
        f"from wrk's histogram (its Lua `done()` hook). Load average at start: "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.",
        "- Images: " + ", ".join(f"{k} {v['bytes']:,} B" for k, v in data["images"].items())
        + ".",
    ]
    for name, p in data["proxies"].items():
        if name.startswith("imageproxy"):
            lines.append(f"- {name} options: `{' '.join(p['options'])}`"
                         + (f"; dropped (rejected): `{' '.join(p['dropped'])}`"
                            if p["dropped"] else ""))
    lines += ["", "## Targets", ""]
    verdicts = {True: "**pass**", False: "**FAIL**", None: "–"}
    lines += _table(("target", "required", "measured", "result"),
                    [(t["name"], t["required"], t["measured"], verdicts[t["pass"]])
                     for t in data["targets"]])

    throughput = [k for k in ("small", "medium", "large", "many-origins") if k in summary]
    throughput += sorted(k for k in summary if k.startswith("small-workers"))
    if throughput:
        lines += ["", "## Throughput", "",
                  "CPU µs/request is utime+stime of the proxy's processes over the run divided "
                  "by completed requests; peak RSS is sampled every 100 ms.", ""]
        rows = []
        for scenario in throughput:
            for proxy, e in summary[scenario].items():
                conns = int(e["connections"]["median"]) if "connections" in e else "?"
                rows.append((f"{scenario} ({conns} conns)", proxy, _fmt(e, "rps", 0),
                             _fmt(e, "mb_s"), _fmt(e, "p50_ms", 2), _fmt(e, "p99_ms", 2),
                             _fmt(e, "cpu_us_per_req", 0), _fmt(e, "peak_rss_mib", 0),
                             str(e["invalid_runs"])))
        lines += _table(("scenario", "proxy", "req/s", "MB/s", "p50 ms", "p99 ms", "CPU µs/req",
                         "peak RSS MiB", "invalid runs"), rows)
    if "slow-clients" in summary:
        lines += ["", "## Slow clients", "",
                  f"{s['slow_clients']} clients fetch the large image with SO_RCVBUF "
                  f"{s['slow_rcvbuf']} B and an MSS of 1460 B (both set before connect) and "
                  f"read {s['slow_rate'] // 1024} KiB/s for "
                  f"{s['slow_duration']:.0f} s, then stop reading for 1 s. Pulled: body bytes "
                  "the origin sent (its access log); read by proxy: pulled minus what still "
                  "sits in the origin's send queue and the proxy's receive queue; held by the "
                  "proxy: pulled − delivered − "
                  "bytes in the kernel's TCP queues (/proc/net/tcp) on the whole path. Each "
                  "repetition starts a fresh proxy process, warmed with four requests.", ""]
        rows = [(proxy, _fmt(e, "pulled_per_client_kib", 0), _fmt(e, "read_per_client_kib", 0),
                 _fmt(e, "delivered_per_client_kib", 0),
                 _fmt(e, "kernel_queued_bytes", 0, 1 / 1024 / max(1, s["slow_clients"])),
                 _fmt(e, "held_per_client_kib"), _fmt(e, "peak_rss_mib", 0),
                 _fmt(e, "rss_growth_mib")) for proxy, e in summary["slow-clients"].items()]
        lines += _table(("proxy", "pulled KiB/client", "read by proxy KiB/client",
                         "delivered KiB/client",
                         "kernel queues KiB/client", "held KiB/client", "peak RSS MiB",
                         "RSS growth MiB"), rows)
    if "connections" in summary:
        lines += ["", "## Connections", "",
                  f"{s['crowd']:,} connections opened and left idle {s['crowd_idle']:.0f} s, "
                  "then one request for the small image on each at once; held: accepted by "
                  "the proxy (not merely queued by the kernel). Each repetition starts a fresh "
                  "proxy process, warmed with four requests; RSS/conn is the RSS growth while "
                  "idle divided by the connections.", ""]
        rows = [(proxy, _fmt(e, "connected", 0), _fmt(e, "held", 0), _fmt(e, "served", 0),
                 _fmt(e, "serve_s"), _fmt(e, "held_rss_mib", 0), _fmt(e, "rss_per_conn_kib"),
                 _fmt(e, "peak_rss_mib", 0)) for proxy, e in summary["connections"].items()]
        lines += _table(("proxy", "connected", "held", "served", "serve s",
                         "RSS idle MiB", "RSS/conn KiB", "peak RSS MiB"), rows)
    if "zipf" in summary:
        lines += ["", "## Cache (Zipf)", ""] + _zipf_section(data)
    problems = [r for r in data["runs"] if "skipped" in r or "error" in r]
    if problems or data["notes"]:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in data["notes"]]
        lines += [f"- {r['scenario']} {r['proxy']} rep {r['rep']}: "
                  f"{r.get('skipped') or r.get('error')}" for r in problems]
    lines += ["", f"Run took {data['elapsed_s']:.0f} s. Raw figures: the `.json` file beside "
              "this one.", ""]
    return "\n".join(lines)


def zipf_share(top: int, urls: int, exponent: float) -> float:
    """The share of Zipf requests that go to the ``top`` most popular of ``urls`` URLs."""
    weights = [1 / k ** exponent for k in range(1, urls + 1)]
    return sum(weights[:top]) / sum(weights)


def _zipf_section(data: dict[str, Any]) -> list[str]:
    """The cache section: the workload, a table per mode, the speed-up and how to read it."""
    z, summary = data.get("zipf") or {}, data["summary"]["zipf"]
    lines = []
    if z:
        lines += [
            f"{z['urls']:,} distinct URLs of the {z['image']} image ({z['image_bytes']:,} B; "
            f"{z['urls'] * z['image_bytes'] / 1e6:.0f} MB in all) on an origin that sends "
            "`Cache-Control: public, max-age=3600`. Requests follow a Zipf distribution with "
            f"exponent {z['exponent']} (rank k drawn with weight 1/k^{z['exponent']}): a "
            f"sequence of {z['sequence']:,} requests, sampled once (seed `{z['seed']}`, "
            f"{z['distinct_in_sequence']:,} distinct URLs), replayed from its start by every "
            f"run, over {z['connections']} connections for {z['duration']} s. imageproxy only "
            "(no nginx reference: the nginx proxy here has no cache). Cache on: imageproxy's "
            "defaults (64 MiB cache, 1 MiB largest object, coalescing on); cache off: "
            "`--cache-size 0 --coalesce-max-size 0`; `--metrics` in both. The modes alternate "
            "and every run starts a fresh imageproxy process: each begins with a cold cache.",
            "",
            "Hit ratio: hits / (hits + misses + stale) from `/metrics`, over the run; origin "
            "share: requests the origin logged during the run / requests completed by the load "
            "generator (coalesced requests are misses that did not reach the origin); cache "
            "MiB and entries: `imageproxy_cache_bytes` and `imageproxy_cache_entries` at the "
            "end.",
            "",
        ]
    modes = [m for m in ("cache-on", "cache-off") if m in summary]
    rows = [(mode, _fmt(summary[mode], "rps", 0), _fmt(summary[mode], "mb_s"),
             _fmt(summary[mode], "p50_ms", 2), _fmt(summary[mode], "p99_ms", 2),
             _fmt(summary[mode], "hit_ratio", 3), _fmt(summary[mode], "origin_share", 3),
             _fmt(summary[mode], "origin_requests", 0), _fmt(summary[mode], "requests", 0),
             _fmt(summary[mode], "cache_mib"), _fmt(summary[mode], "cache_entries", 0),
             _fmt(summary[mode], "cpu_us_per_req", 0), _fmt(summary[mode], "peak_rss_mib", 0),
             str(summary[mode]["invalid_runs"])) for mode in modes]
    lines += _table(("mode", "req/s", "MB/s", "p50 ms", "p99 ms", "hit ratio", "origin share",
                     "origin requests", "client requests", "cache MiB", "cache entries",
                     "CPU µs/req", "peak RSS MiB", "invalid runs"), rows)
    on, off = (_get(data["summary"], "zipf", m, "rps") for m in ("cache-on", "cache-off"))
    if on is not None and off:
        by_rep: dict[int, dict[str, float]] = {}
        for r in data["runs"]:
            if r.get("scenario") == "zipf" and "rps" in r:
                by_rep.setdefault(r["rep"], {})[r["proxy"]] = r["rps"]
        paired = [v["cache-on"] / v["cache-off"] for v in by_rep.values()
                  if v.get("cache-off") and "cache-on" in v]
        lines += ["", f"Speed-up, cache on / off: **{on / off:.2f}x** (median req/s)"
                  + (f"; per repetition {min(paired):.2f}x–{max(paired):.2f}x"
                     if len(paired) > 1 else "") + "."]
    entries = _get(data["summary"], "zipf", "cache-on", "cache_entries")
    distinct = _get(data["summary"], "zipf", "cache-on", "distinct_urls")
    requests = _get(data["summary"], "zipf", "cache-on", "requests")
    if z and entries and distinct and requests:
        lines += ["", f"Reading the hit ratio: the cache ended with {entries:.0f} entries, and "
                  f"the {entries:.0f} most popular URLs draw "
                  f"{zipf_share(int(entries), z['urls'], z['exponent']):.1%} of the requests "
                  "(what a cache holding exactly them would hit in the long run); the first "
                  f"{requests:,.0f} requests of the sequence name {distinct:,.0f} distinct URLs, "
                  "each a miss in a cold cache, so no cache could exceed "
                  f"{1 - distinct / requests:.1%} in such a run."]
    return lines


def write_reports(data: dict[str, Any], out_dir: Path, stamp: dt.datetime) -> tuple[Path, Path]:
    """Write ``<date>.md`` and ``<date>.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / stamp.strftime("%Y-%m-%d-%H%M")
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md.write_text(markdown(data))
    return md, js
