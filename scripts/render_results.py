#!/usr/bin/env python3
"""Render bench/RESULTS.md and bench/results.json from the JSON files scripts/bench wrote."""
import json, os, platform, re, subprocess, sys, datetime

# `render_results.py --only recordings|renewals|audit|restart|leaves DIR RESULTS.md results.json`: put only that
# section (from DIR/recordings.json, or DIR/renewals-*.json and DIR/criterion.txt) into existing
# results, for a run of that scenario alone. `--recordings` is `--only recordings`.
only = None
if sys.argv[1] == "--recordings":
    only = "recordings"
    sys.argv.pop(1)
elif sys.argv[1] == "--only":
    only = sys.argv[2]
    del sys.argv[1:3]
src, md_path, json_path = sys.argv[1], sys.argv[2], sys.argv[3]
load = lambda name: json.load(open(os.path.join(src, name)))
opt = lambda name: load(name) if os.path.exists(os.path.join(src, name)) else None


def read_criterion():
    crit = {}
    path = os.path.join(src, "criterion.txt")
    if not os.path.exists(path):
        return crit
    lines = open(path).read().splitlines()
    for line in lines:
        m = re.match(r"^(\S+)\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m:
            crit[m.group(1)] = f"{m.group(2)} {m.group(3)}"
    # criterion prints long names on their own line, the numbers on the next
    for i, line in enumerate(lines):
        m = re.match(r"^\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m and i > 0 and lines[i - 1].strip() and " " not in lines[i - 1].strip():
            crit[lines[i - 1].strip()] = f"{m.group(1)} {m.group(2)}"
    return crit


def renewal_runs():
    runs = []
    for i in range(1, 10):
        r = opt(f"renewals-{i}.json")
        if r:
            runs.append(r)
    return runs


def renewals_section():
    runs = renewal_runs()
    if not runs:
        return "## Machine ID renewals\n\nNot run (`loadgen renewals`).\n"
    med = lambda k: sorted(r[k] or 0 for r in runs)[len(runs) // 2]
    rows = "\n".join(
        f"| {i + 1} | {r['renewals_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
        f"{(r['auth_cpu_s'] or 0) / r['duration_s'] * 100:.0f} % | {r['renewals_per_auth_cpu_s'] or 0:.0f} | "
        f"{r['generations_stored']} of {r['renewals']} |"
        for i, r in enumerate(runs))
    b = runs[0]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"""## Machine ID renewals (`loadgen renewals --bots {b['bots']} --duration {b['duration_s']:.0f}s`, {len(runs)} runs, commit `{head}`)

{b['bots']} simulated bots, each on its own kept mutual-TLS connection to Auth, renew their SSH + X.509
identity back to back through the real `Renew` RPC (Ed25519 SSH certificate and P-256-signed X.509
certificate, the presented certificate checked, the new generation and its audit event written in a
batched SQLite transaction before the answer leaves). The generator runs on the same 2 cores.

| run | renewals/s | p50 ms | p99 ms | errors | Auth CPU (of one core) | renewals per Auth CPU-second | generations stored of renewals answered |
|---|---|---|---|---|---|---|---|
{rows}

Median: **{med('renewals_per_s'):.0f} renewals/s, {med('renewals_per_auth_cpu_s'):.0f} per Auth CPU-second** (goal: 10,000/s on this
machine with the generator on it: not reached; the two cores are saturated by Auth and the generator).
Flame graph: `flamegraphs/renewals-auth-*.svg` (`scripts/flamegraph --process auth renewals`).
"""


def audit_section():
    runs = [r for r in (opt("audit-sqlite.json"), opt("audit-postgres.json")) if r]
    big = opt("audit-10m.json")
    if not runs and not big:
        return "## Audit at fleet scale\n\nNot run (`loadgen audit`).\n"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = "\n".join(
        f"| {r['storage']} | {r['emitters']} × {r['batch']} | **{r['events_per_s']:.0f}** | {r['batch_p50_ms']:.0f} / {r['batch_p99_ms']:.0f} | "
        f"{(r['auth_cpu_s'] or 0) / r['duration_s'] * 100:.0f} % | {r['events_per_auth_cpu_s'] or 0:.0f} | {r['rows_in_database']} of {r['events_stored']} | {r['errors']} |"
        for r in runs)
    search = ""
    if big:
        search = (f"\nSearch: with **{big['rows_total']:,} events** stored ({big['storage']}, ingested at {big['events_per_s']:.0f}/s), "
                  f"{big['searches']} searches for one actor's events of the last hour (`SearchEvents`, the `(actor, time)` index, "
                  f"at most 1000 answered): **p50 {big['search_p50_ms']:.2f} ms, p99 {big['search_p99_ms']:.2f} ms, max {big['search_max_ms']:.2f} ms** "
                  f"(goal: < 100 ms); {big['search_hits']} events found.\n")
    return f"""## Audit at fleet scale (`loadgen audit --duration 10s [--storage postgres]`, commit `{head}`)

Emitters on their own mutual-TLS connections send batches through the real `EmitEvents` RPC;
Auth validates and attributes each event and writes every batch waiting in one transaction
(group commit): an answer means durable (SQLite `synchronous=FULL`; PostgreSQL started by the
scenario with fsync on). Rows are then counted in the database itself.

| storage | emitters × batch | events/s stored | batch p50 / p99 ms | Auth CPU (of one core) | events per Auth CPU-second | rows counted of answered | errors |
|---|---|---|---|---|---|---|---|
{rows}
{search}
Goal 100,000 events/s: not reached (see `docs/measurements.md`, issue 27).
"""


def restart_section():
    runs = [r for r in (opt("auth-restart-10s.json"), opt("auth-restart-90s.json")) if r]
    if not runs:
        return "## Edge proxies while every Auth restarts\n\nNot run (`loadgen auth-restart`).\n"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = "\n".join(
        f"| {r['down_seconds']:.0f} s | {r['tunnels_before']} | **{r['agent_reconnects']}** | {r['auth_connections']} in {r['observe_seconds']:.0f} s | "
        f"{r['heartbeat_rows_per_s']:.0f} | {r['heartbeat_calls_per_s']:.2f} | **{r['nodes_back_seconds']:.2f} s** |"
        for r in runs)
    b = runs[0]
    return f"""## Edge proxies while every Auth restarts (`loadgen auth-restart --agents {b['agents']} --down 10s|90s --observe 60s`, commit `{head}`)

PostgreSQL (fsync on), {b['auths']} Auth processes on it, {b['proxies']} proxies given both; {b['agents']:,} simulated agents, each
with its own joined identity and a tunnel to each proxy ({b['tunnels_before']:,} tunnels; set up in {b['join_seconds']:.0f} s of joins and
{b['connect_seconds']:.0f} s of dials). Both Auths stop (SIGTERM), stay down, start again on the same addresses. The simulated
agents never redial, so a reconnect would show as a tunnel lost. Heartbeat rates are both Auths' counters over the
observation after the restart; nodes are written when they change or every 20 s (Auth lists a node 60 s).
After 90 s down every node had expired, so the listing waits for each proxy's next batch (every 5 s).

| Auths down | tunnels | agent reconnects (goal 0) | connections Auth accepted | heartbeat rows/s | heartbeat calls/s | until `ListNodes` shows all again |
|---|---|---|---|---|---|---|
{rows}
"""


def leaves_section():
    r = opt("leaves.json")
    if not r:
        return "## Trusted clusters at scale\n\nNot run (`loadgen leaves`).\n"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"""## Trusted clusters at scale (`loadgen leaves --leaves {r['simulated_leaves']} --agents {r['leaf_agents']} --lists {r['lists']}`, commit `{head}`)

A root and a leaf cluster (each Auth and proxy as processes; the leaf trusts the root). The leaf's
{r['leaf_agents']:,} simulated agents (own identities) are listed through the root's proxy as `gsh ls --cluster leaf`
does: **{r['nodes_listed']:,} nodes, p50 {r['list_p50_ms']:.1f} ms, max {r['list_max_ms']:.1f} ms** over {r['lists']} listings (goal < 1 s).
Then {r['simulated_leaves']} simulated leaves, each with its own CA trusted through `ValidateTrustedCluster`, hold a tunnel each to
the root's proxy: {r['leaf_tunnels_held']} held; root proxy RSS {r['root_proxy_rss_before_kib']:,} → {r['root_proxy_rss_trusted_kib']:,} KiB once
the leaves are trusted ({r['root_proxy_kib_per_trusted_leaf']:.1f} KiB per trusted leaf: its CA's verifier and record) → {r['root_proxy_rss_after_kib']:,} KiB
with their tunnels: **{r['root_proxy_kib_per_leaf_tunnel']:.1f} KiB per leaf tunnel** (agents' tunnels: 8.4 KiB).
"""


def replace_section(md, heading, section, before):
    if heading in md:
        a = md.index(heading)
        b = md.index("\n## ", a + 1)
        return md[:a] + section + md[b:]
    b = md.index(before)
    return md[:b] + section + "\n" + md[b:]


if only == "recordings":
    exec_src = open(__file__).read()
    start = exec_src.index("\ndef recordings_section():") + 1
    exec(exec_src[start:exec_src.index("\n\n\n", start)])
    md = replace_section(open(md_path).read(), "## Session recordings", recordings_section(), "## Tunnels: idle agents")
    open(md_path, "w").write(md)
    res = json.load(open(json_path))
    rec = load("recordings.json")
    res.setdefault("raw", {})["recordings"] = rec
    res["results"] = [r for r in res["results"] if not str(r.get("scenario", "")).startswith("recordings")]
    res["results"] += [
        {"scenario": "recordings-agent-overhead", "baseline": "recording off", "unit": "ratio", "value": rec.get("overhead_ratio")},
        {"scenario": "recordings-auth-cpu", "baseline": "one core", "unit": "%", "value": rec["ingest"]["auth_core_pct_steady"]},
        {"scenario": "recordings-ingest", "baseline": "Auth CPU-second", "unit": "MB", "value": rec["ingest"]["mb_recorded_per_auth_cpu_s"]},
    ]
    json.dump(res, open(json_path, "w"), indent=2)
    sys.exit(0)


def renewal_results(runs):
    med = lambda k: sorted(r[k] or 0 for r in runs)[len(runs) // 2]
    return [
        {"scenario": "renewals", "baseline": "goal 10000", "unit": "renewals/s", "value": med("renewals_per_s")},
        {"scenario": "renewals", "baseline": "Auth CPU-second", "unit": "renewals", "value": med("renewals_per_auth_cpu_s")},
        {"scenario": "renewals", "baseline": "goal 10000", "unit": "p99 ms", "value": med("p99_ms")},
    ] if runs else []


if only == "audit":
    md = replace_section(open(md_path).read(), "## Audit at fleet scale", audit_section(), "## Micro-benchmarks")
    open(md_path, "w").write(md)
    res = json.load(open(json_path))
    res.setdefault("raw", {})["audit"] = [r for r in (opt("audit-sqlite.json"), opt("audit-postgres.json"), opt("audit-10m.json")) if r]
    res["results"] = [r for r in res["results"] if r.get("scenario") != "audit"] + [
        {"scenario": "audit", "baseline": f"goal 100000 ({r['storage']})", "unit": "events/s", "value": r["events_per_s"]}
        for r in (opt("audit-sqlite.json"), opt("audit-postgres.json")) if r]
    json.dump(res, open(json_path, "w"), indent=2)
    sys.exit(0)


if only == "restart":
    md = replace_section(open(md_path).read(), "## Edge proxies while every Auth restarts", restart_section(), "## Micro-benchmarks")
    open(md_path, "w").write(md)
    res = json.load(open(json_path))
    runs = [r for r in (opt("auth-restart-10s.json"), opt("auth-restart-90s.json")) if r]
    res.setdefault("raw", {})["auth-restart"] = runs
    res["results"] = [r for r in res["results"] if r.get("scenario") != "auth-restart"] + [
        {"scenario": "auth-restart", "baseline": f"goal 0 (down {r['down_seconds']:.0f} s)", "unit": "agent reconnects", "value": r["agent_reconnects"]}
        for r in runs] + [
        {"scenario": "auth-restart", "baseline": f"down {r['down_seconds']:.0f} s", "unit": "s until all nodes listed", "value": r["nodes_back_seconds"]}
        for r in runs]
    json.dump(res, open(json_path, "w"), indent=2)
    sys.exit(0)


if only == "leaves":
    md = replace_section(open(md_path).read(), "## Trusted clusters at scale", leaves_section(), "## Micro-benchmarks")
    open(md_path, "w").write(md)
    res = json.load(open(json_path))
    r = load("leaves.json")
    res.setdefault("raw", {})["leaves"] = r
    res["results"] = [x for x in res["results"] if x.get("scenario") != "leaves"] + [
        {"scenario": "leaves", "baseline": "goal 1000 ms", "unit": "ms to list a 1,000-agent leaf (max)", "value": r["list_max_ms"]},
        {"scenario": "leaves", "baseline": "agent tunnel 8.4 KiB", "unit": "KiB per leaf tunnel", "value": r["root_proxy_kib_per_leaf_tunnel"]},
    ]
    json.dump(res, open(json_path, "w"), indent=2)
    sys.exit(0)


if only == "renewals":
    md = replace_section(open(md_path).read(), "## Machine ID renewals", renewals_section(), "## Micro-benchmarks")
    crit = read_criterion()
    if crit:
        a = md.index("## Micro-benchmarks")
        head = md.index("|---|---|\n", a) + len("|---|---|\n")
        end = md.index("\n\n", head)
        table = {}
        for line in md[head:end].splitlines():
            m = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
            if m:
                table[m.group(1)] = m.group(2)
        table.update(crit)
        md = md[:head] + "".join(f"| `{k}` | {v} |\n" for k, v in sorted(table.items())).rstrip("\n") + md[end:]
    open(md_path, "w").write(md)
    res = json.load(open(json_path))
    runs = renewal_runs()
    res.setdefault("raw", {})["renewals"] = runs
    if crit:
        res["raw"].setdefault("criterion", {}).update(crit)
    res["results"] = [r for r in res["results"] if r.get("scenario") != "renewals"] + renewal_results(runs)
    json.dump(res, open(json_path, "w"), indent=2)
    sys.exit(0)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
machine = f"{os.cpu_count()} vCPU {cpu}, {int(mem)//1024//1024} GiB, Linux {platform.release()}"
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

logins = load("logins.json")
thr = load("throughput.json")
# latency, sessions and tunnels: every round and the medians over the rounds (loadgen --runs).
tun_all = load("tunnels.json")
tun = tun_all["median"]
latsum = {"20000": load("latency-20k.json"), "2000": load("latency-2k.json")}
lat = {rate: s["medians"] for rate, s in latsum.items()}
icount = open(os.path.join(src, "icount.txt")).read().strip() if os.path.exists(os.path.join(src, "icount.txt")) else "not run"
# Sessions: each path with full handshakes (a new client per session) and resumed ones (one
# client for all sessions); keys "proxy", "proxy (resumed)", ...
skey = lambda s: s["path"] + (" (resumed)" if s.get("resumption") else "")
ses_all = load("sessions.json")
ses = {skey(s): s for s in ses_all["medians"]}
# SSH: every path's medians over the rounds (russh sessions and bulk; OpenSSH scp), and the
# paths that could not run here with the reason.
ssh_all = load("ssh.json")
ssh = {s["path"]: s for s in ssh_all["medians"]}
ssh.update({s["path"]: {"path": s["path"], "skipped": s["reason"]} for s in ssh_all.get("skipped", [])})
scp = {s["path"]: s for s in ssh_all.get("scp_medians", [])}
med = {m["path"]: m for m in thr["medians"]}
# One session: a single stream (throughput --streams 1), absent in older runs.
one = {m["path"]: m for m in (opt("throughput-1.json") or {"medians": []})["medians"]}
# Downloads: a source behind each path sends to the client (throughput --direction download).
down_all = opt("throughput-down.json")
down = {m["path"]: m for m in (down_all or {"medians": []})["medians"]}
# The host's default TCP congestion control during the run, and the same paths with it on cubic.
host_cc = open(os.path.join(src, "host-cc.txt")).read().strip() if os.path.exists(os.path.join(src, "host-cc.txt")) else "?"
hcc_all = opt("throughput-host-cubic.json")
hcc = {m["path"]: m for m in (hcc_all or {"medians": []})["medians"]}
epoll = {"latency-20k": opt("latency-20k-epoll.json"), "latency-2k": opt("latency-2k-epoll.json"),
         "sessions": opt("sessions-epoll.json"), "tunnels": opt("tunnels-epoll.json")}
# The agents' tunnel transports over an emulated lossy link (loadgen link), on the host's
# default and with the host on cubic (TLS only); absent where the run had no TUN device.
link_all = opt("link.json")
link_cubic = opt("link-host-cubic.json")
tunq_all = opt("tunnels-quic.json")
tunq = tunq_all["median"] if tunq_all else None
zc = opt("send-zc.json") or []
# Sessions on a one-worker proxy (one proxy core), per backend; absent in older runs.
ses1 = {b: {skey(s): s for s in (opt(f) or {"medians": []})["medians"]} for b, f in (("io_uring", "sessions-1w.json"), ("epoll", "sessions-1w-epoll.json"))}
crit = read_criterion()

def one_core_sessions():
    rows = [f"| {b} | {k.replace('proxy', 'proxy, one worker')} | {s['sessions_per_s']:.0f} | {s.get('resumed', 0)} of {s['sessions']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {per_cpu(s)} |"
            for b, m in ses1.items() for k, s in m.items() if k.startswith("proxy")]
    if not rows:
        return ""
    return """
**One proxy core** (`--workers 1`): the same scenario against a proxy with one worker thread,
which serves every connection and owns every tunnel (no session changes core). The rows above use
one worker per core (two here), each sharing its core with the generator, so each worker idles
and wakes between sessions, and a session whose tunnel is on the other worker moves there after
its handshake.

| backend | path | sessions/s | resumed | p50 ms | p99 ms | per proxy CPU-second |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"

def zc_section():
    if not zc:
        return ""
    rows = "".join(f"| `{m['op']}` | {m['gb_per_s']:.3f} | {m['gb_per_sender_cpu_s']:.2f} | {m['gb_per_cpu_s']:.2f} |\n" for m in zc)
    return f"""
**Zero-copy send** (`send-zc --rounds 3 --seconds 2 --chunk-kib 64`, `bench/src/bin/send_zc.rs`):
one loopback TCP connection, {zc[0]['inflight']} sends of {zc[0]['chunk_kib']} KiB in flight
through an io_uring, plain `SEND` against `SEND_ZC` in alternating rounds, a reader thread on
the other end; medians of {zc[0]['rounds']}. On loopback the receiving socket's TCP work runs in
the sender's context, so the sender's CPU includes it.

| send | GB/s | GB per sender CPU-second | GB per CPU-second (sender + reader) |
|---|---|---|---|
""" + rows

def per_cpu(s):
    v = s.get('sessions_per_middle_cpu_s')
    return f"{v:.0f}" if v else "—"

def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "n/a"

def baseline_row(name, m):
    if m.get("skipped"):
        return f"| {name} | skipped: {m['skipped'].splitlines()[0]} | | | |"
    pm = med.get("proxy", {})
    return (f"| {name} | {m.get('median_gb_per_s', 0):.3f} | {m.get('median_gb_per_middle_cpu_s') or 0:.2f} | "
            f"{ratio(pm.get('median_gb_per_s'), m.get('median_gb_per_s'))} | "
            f"{ratio(pm.get('median_gb_per_middle_cpu_s'), m.get('median_gb_per_middle_cpu_s'))} |")

def one_table(one=one):
    if not one:
        return "Not run.\n"
    d1 = one.get("direct", {})
    p1 = one.get("proxy", {})
    rows = ["| path | GB/s | GB per middle-box CPU-second | ÷ direct | proxy (io_uring) ÷ path (per CPU-s) |",
            "|---|---|---|---|---|",
            f"| direct | {d1.get('median_gb_per_s', 0):.3f} | — | 1.00× | — |"]
    for key, name in (("naive", "naive relay"), ("openssh", "OpenSSH jump host"), ("rathole", "rathole (TLS transport)"),
                      ("proxy", "**gatehouse proxy**"), ("proxy-epoll", "gatehouse proxy"),
                      ("proxy-cubic", "gatehouse proxy, `--proxy-tcp-congestion cubic`")):
        m = one.get(key)
        if not m:
            continue
        if m.get("skipped"):
            rows.append(f"| {name} | skipped: {m['skipped'].splitlines()[0]} | | | |")
            continue
        backend = f" ({m.get('proxy_io_backend') or '?'})" if key.startswith("proxy") else ""
        rows.append(f"| {name}{backend} | {m.get('median_gb_per_s', 0):.3f} | "
                    f"{m.get('median_gb_per_middle_cpu_s') or 0:.2f} | {ratio(m.get('median_gb_per_s'), d1.get('median_gb_per_s'))} | "
                    f"{ratio(p1.get('median_gb_per_middle_cpu_s'), m.get('median_gb_per_middle_cpu_s'))} |")
    return "\n".join(rows) + "\n"

def host_cubic_section():
    if not hcc:
        return ""
    return f"""
## The host on cubic: 4 TLS streams, every process's congestion control switched from {host_cc} to cubic (`loadgen throughput --streams 4 --duration 5s --runs 3`)

Not a verdict: the same machine with its default changed (`sysctl net.ipv4.tcp_congestion_control=cubic`,
restored after), for every path alike: generator, baselines and proxy. {host_cc} paces each
sender with a high-resolution timer, and on loopback a receiver's ACK often runs the sender's
transmit in the receiver's context, so part of a client's or agent's pacing lands on the middle
box's CPU. Medians of 3 interleaved rounds.

""" + one_table(hcc)

def link_section():
    if not link_all:
        return ""
    imp = link_all["impairment"]
    delay_ms = imp["delay"]["secs"] * 1000 + imp["delay"]["nanos"] / 1e6
    queue_ms = imp["queue"]["secs"] * 1000 + imp["queue"]["nanos"] / 1e6
    rate = f"{imp['rate_bps'] / 1e6:.0f} Mbit/s" if imp["rate_bps"] else "no rate limit"
    rows = []
    def row(m, label):
        l = m.get("loaded")
        beside = f"{l['p50_us'] / 1000:.1f} / {l['p99_us'] / 1000:.1f} / {l['p999_us'] / 1000:.1f}" if l else "—"
        return (f"| {m['loss_pct']:g} % | {label} | {m['download_mbit_per_s']:.1f} | {m['p50_us'] / 1000:.1f} | "
                f"{m['p99_us'] / 1000:.1f} | {m['p999_us'] / 1000:.1f} | {m['max_us'] / 1000:.1f} | {beside} |")
    losses = sorted({m["loss_pct"] for m in link_all["medians"]})
    for loss in losses:
        for m in link_all["medians"]:
            if m["loss_pct"] == loss:
                label = f"TLS over TCP ({host_cc})" if m["transport"] == "tls" else "QUIC (quinn's cubic)"
                rows.append(row(m, label))
        for m in (link_cubic or {"medians": []})["medians"]:
            if m["loss_pct"] == loss and m["transport"] == "tls":
                rows.append(row(m, "TLS over TCP (the host on cubic)"))
    n = len(link_all["runs"]) // max(1, len(link_all["medians"]))
    return f"""

## Agent tunnels over a lossy link: QUIC beside TLS (`loadgen link --loss {','.join(f'{l:g}' for l in losses)} --duration 5s --runs {n}`)

The simulated agents reach the proxy over an emulated wide-area link instead of loopback: a TUN
device with the impairment in user space (this kernel has no `netem`; `loadgen/src/link.rs`),
each direction {delay_ms:g} ms one way ({2 * delay_ms:g} ms round trip), {rate} with a drop-tail
queue of {queue_ms:g} ms, and random loss of each packet at the rate in the first column. Users
still reach the proxy on the same host. Per loss rate and transport: one session downloading
from the agent through its tunnel for 5 s (the rate the client read), then
{link_all['sessions']} sessions sending 64-byte requests at {link_all['rate_per_s']:g}/s in all
through the same tunnel to the agent's echo for 5 s (coordinated omission corrected, as below),
and the same requests again while a download runs through the same tunnel (the last column: p50
/ p99 / p99.9 ms; what an interactive session feels while a transfer shares its agent).
One proxy per transport, both behind the same link, their tunnels kept through the run: the loss
rates go in rising order, each after a 5 s download through every tunnel that is not measured
(a congestion controller carries its state from one loss rate to the next), then {n} rounds
that interleave the transports; medians of the rounds. The TLS tunnel's congestion control is
the kernel's (the row says which); quinn runs its own, cubic by default. Over TLS every session
is a stream inside the tunnel's one TCP connection, so a lost packet holds back all of them until
its retransmission; over QUIC each session is a QUIC stream of its own, and a loss holds back
only the sessions whose data the packet carried.

| loss | tunnel | download Mbit/s | p50 ms | p99 ms | p99.9 ms | max ms | with a download beside |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"

def added(summary, key):
    """The median of the rounds' added latency (each round's proxy run minus its direct run)."""
    return summary["added"][key] if summary else None

def rounds_of(summary, key):
    return ", ".join(f"{r['added'][key]:+d}" for r in summary["rounds"])

def backend_table():
    rows = ["| measure | io_uring | epoll | io_uring ÷ epoll |", "|---|---|---|---|"]
    def row(name, a, b, fmt, better_low=False):
        fa = fmt.format(a) if a is not None else "not run"
        fb = fmt.format(b) if b is not None else "not run"
        r = f"{a / b:.2f}×" if a and b else "—"
        rows.append(f"| {name} | {fa} | {fb} | {r} |")
    row("throughput GB/s (median of 3)", p.get("median_gb_per_s"), pe.get("median_gb_per_s"), "{:.3f}")
    row("throughput GB per proxy CPU-second", p.get("median_gb_per_middle_cpu_s"), pe.get("median_gb_per_middle_cpu_s"), "{:.2f}")
    se = {skey(s): s for s in (epoll["sessions"] or {"medians": []})["medians"]}
    row("new sessions/s", ses.get("proxy", {}).get("sessions_per_s"), se.get("proxy", {}).get("sessions_per_s"), "{:.0f}")
    row("sessions per proxy CPU-second", ses.get("proxy", {}).get("sessions_per_middle_cpu_s"), se.get("proxy", {}).get("sessions_per_middle_cpu_s"), "{:.0f}")
    row("resumed sessions per proxy CPU-second", ses.get("proxy (resumed)", {}).get("sessions_per_middle_cpu_s"), se.get("proxy (resumed)", {}).get("sessions_per_middle_cpu_s"), "{:.0f}")
    for k, name in (("proxy", "sessions per proxy CPU-second, one worker"), ("proxy (resumed)", "resumed sessions per proxy CPU-second, one worker")):
        row(name, ses1["io_uring"].get(k, {}).get("sessions_per_middle_cpu_s"), ses1["epoll"].get(k, {}).get("sessions_per_middle_cpu_s"), "{:.0f}")
    for rate, key in (("20000", "latency-20k"), ("2000", "latency-2k")):
        row(f"p50 added at {rate}/s (µs)", added(latsum[rate], "p50_us"), added(epoll[key], "p50_us"), "{}")
        row(f"p99 added at {rate}/s (µs)", added(latsum[rate], "p99_us"), added(epoll[key], "p99_us"), "{}")
    te = (epoll["tunnels"] or {}).get("median", {})
    row("KiB proxy RSS per idle tunnel (15,000)", tun.get("proxy_kib_per_tunnel"), te.get("proxy_kib_per_tunnel"), "{:.1f}")
    row("tunnel connects/s", tun.get("connects_per_second"), te.get("connects_per_second"), "{:.0f}")
    return "\n".join(rows)

SSH_NAMES = {"gatehouse": "**Gatehouse** (Proxy + agent)", "proxyjump": "ProxyJump (jump sshd → target sshd)", "openssh": "direct sshd"}

def ssh_row(m):
    name = SSH_NAMES.get(m["path"], m["path"])
    if m.get("skipped"):
        return f"| {name} | skipped: {m['skipped'].splitlines()[0]} | | | | | |"
    f = lambda v, fmt: fmt.format(v) if v is not None else "—"
    return (f"| {name} | {m['sessions_per_s']:.0f} ({m['errors']} errors) | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{f(m.get('sessions_per_server_cpu_s'), '{:.0f}')} | {m['bulk_gb_per_s']:.3f} | {f(m.get('bulk_gb_per_server_cpu_s'), '{:.2f}')} |")

def scp_row(m):
    name = SSH_NAMES.get(m["path"], m["path"])
    f = lambda v, fmt: fmt.format(v) if v is not None else "—"
    return (f"| {name} | {m['seconds']:.2f} | {m['gb_per_s']:.3f} | {f(m.get('server_cpu_s'), '{:.2f}')} | "
            f"{f(m.get('gb_per_server_cpu_s'), '{:.2f}')} | {f(m.get('client_cpu_s'), '{:.2f}')} |")

def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "—"

def ssh_gap_words():
    g, j = ssh.get("gatehouse", {}).get("bulk_gb_per_server_cpu_s"), ssh.get("proxyjump", {}).get("bulk_gb_per_server_cpu_s")
    if not (g and j):
        return "the ProxyJump rows are missing here"
    if g < j:
        return f"that extra layer is most of the per-CPU gap ({g / j:.2f}× in bulk)"
    return f"Gatehouse carries that extra layer and still spends less server CPU per byte ({g / j:.2f}× in bulk)"

def ssh_goal():
    """Gatehouse ÷ ProxyJump, the issue's goal (≥ 1.0× in GB/s and in GB per server CPU-second)."""
    g, j = ssh.get("gatehouse", {}), ssh.get("proxyjump", {})
    sg, sj = scp.get("gatehouse", {}), scp.get("proxyjump", {})
    return "\n".join([
        "| measure | Gatehouse ÷ ProxyJump |", "|---|---|",
        f"| bulk GB/s (russh client, one channel into `cat`) | {ratio(g.get('bulk_gb_per_s'), j.get('bulk_gb_per_s'))} |",
        f"| bulk GB per server CPU-second | {ratio(g.get('bulk_gb_per_server_cpu_s'), j.get('bulk_gb_per_server_cpu_s'))} |",
        f"| OpenSSH scp GB/s | {ratio(sg.get('gb_per_s'), sj.get('gb_per_s'))} |",
        f"| OpenSSH scp GB per server CPU-second | {ratio(sg.get('gb_per_server_cpu_s'), sj.get('gb_per_server_cpu_s'))} |",
        f"| new sessions/s | {ratio(g.get('sessions_per_s'), j.get('sessions_per_s'))} |",
    ])

p, n, d = med.get("proxy", {}), med.get("naive", {}), med.get("direct", {})
pe = med.get("proxy-epoll", {})
pc = med.get("proxy-cubic", {})
pq = med.get("proxy-quic", {})
o, r = med.get("openssh", {}), med.get("rathole", {})
sg, so, sj = ssh.get("gatehouse", {}), ssh.get("openssh", {}), ssh.get("proxyjump", {})
results = [
    {"scenario": "throughput", "baseline": "openssh-jump", "unit": "GB/s", "value": o.get("median_gb_per_s"), "skipped": o.get("skipped")},
    {"scenario": "throughput", "baseline": "openssh-jump", "unit": "GB per sshd CPU-second", "value": o.get("median_gb_per_middle_cpu_s"), "skipped": o.get("skipped")},
    {"scenario": "throughput", "baseline": "rathole", "unit": "GB/s", "value": r.get("median_gb_per_s"), "skipped": r.get("skipped")},
    {"scenario": "throughput", "baseline": "rathole", "unit": "GB per rathole-server CPU-second", "value": r.get("median_gb_per_middle_cpu_s"), "skipped": r.get("skipped")},
    {"scenario": "ssh", "baseline": "gatehouse-proxy+agent", "unit": "sessions/s", "value": sg.get("sessions_per_s")},
    {"scenario": "ssh", "baseline": "gatehouse-proxy+agent", "unit": "sessions per server CPU-second", "value": sg.get("sessions_per_server_cpu_s")},
    {"scenario": "ssh", "baseline": "gatehouse-proxy+agent", "unit": "bulk GB/s", "value": sg.get("bulk_gb_per_s")},
    {"scenario": "ssh", "baseline": "openssh-sshd", "unit": "sessions/s", "value": so.get("sessions_per_s"), "skipped": so.get("skipped")},
    {"scenario": "ssh", "baseline": "openssh-sshd", "unit": "sessions per server CPU-second", "value": so.get("sessions_per_server_cpu_s"), "skipped": so.get("skipped")},
    {"scenario": "ssh", "baseline": "openssh-sshd", "unit": "bulk GB/s", "value": so.get("bulk_gb_per_s"), "skipped": so.get("skipped")},
    {"scenario": "ssh", "baseline": "gatehouse-proxy+agent", "unit": "bulk GB per server CPU-second", "value": sg.get("bulk_gb_per_server_cpu_s")},
    {"scenario": "ssh", "baseline": "openssh-sshd", "unit": "bulk GB per server CPU-second", "value": so.get("bulk_gb_per_server_cpu_s"), "skipped": so.get("skipped")},
    *[{"scenario": "ssh", "baseline": "openssh-proxyjump", "unit": u, "value": sj.get(k), "skipped": sj.get("skipped")}
      for u, k in (("sessions/s", "sessions_per_s"), ("sessions per server CPU-second", "sessions_per_server_cpu_s"), ("bulk GB/s", "bulk_gb_per_s"), ("bulk GB per server CPU-second", "bulk_gb_per_server_cpu_s"))],
    *[{"scenario": "scp-1GiB", "baseline": b, "unit": u, "value": scp.get(k, {}).get(f)}
      for k, b in (("gatehouse", "gatehouse-proxy+agent"), ("proxyjump", "openssh-proxyjump"), ("openssh", "openssh-sshd")) if k in scp
      for u, f in (("GB/s", "gb_per_s"), ("GB per server CPU-second", "gb_per_server_cpu_s"))],
    {"scenario": "throughput", "baseline": "direct", "unit": "GB/s", "value": d.get("median_gb_per_s")},
    {"scenario": "throughput", "baseline": "naive-relay", "unit": "GB/s", "value": n.get("median_gb_per_s")},
    {"scenario": "throughput", "baseline": "naive-relay", "unit": "GB per relay CPU-second", "value": n.get("median_gb_per_middle_cpu_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy", "unit": "GB/s", "value": p.get("median_gb_per_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy", "unit": "GB per proxy CPU-second", "value": p.get("median_gb_per_middle_cpu_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy-epoll", "unit": "GB/s", "value": pe.get("median_gb_per_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy-quic-tunnels", "unit": "GB/s", "value": pq.get("median_gb_per_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy-quic-tunnels", "unit": "GB per proxy CPU-second", "value": pq.get("median_gb_per_middle_cpu_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy-epoll", "unit": "GB per proxy CPU-second", "value": pe.get("median_gb_per_middle_cpu_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy-cubic", "unit": "GB/s", "value": pc.get("median_gb_per_s")},
    {"scenario": "throughput", "baseline": "gatehouse-proxy-cubic", "unit": "GB per proxy CPU-second", "value": pc.get("median_gb_per_middle_cpu_s")},
    *[{"scenario": "throughput-host-cubic", "baseline": b, "unit": u, "value": hcc.get(k, {}).get(f), "skipped": hcc.get(k, {}).get("skipped")}
      for k, b in (("direct", "direct"), ("naive", "naive-relay"), ("rathole", "rathole"), ("proxy", "gatehouse-proxy")) if k in hcc
      for u, f in (("GB/s", "median_gb_per_s"), ("GB per middle-box CPU-second", "median_gb_per_middle_cpu_s")) if k != "direct" or f == "median_gb_per_s"],
    {"scenario": "one-session", "baseline": "direct", "unit": "GB/s", "value": one.get("direct", {}).get("median_gb_per_s")},
    {"scenario": "one-session", "baseline": "gatehouse-proxy", "unit": "GB/s", "value": one.get("proxy", {}).get("median_gb_per_s")},
    {"scenario": "one-session", "baseline": "gatehouse-proxy-epoll", "unit": "GB/s", "value": one.get("proxy-epoll", {}).get("median_gb_per_s")},
    *[{"scenario": "one-session", "baseline": b, "unit": "GB per middle-box CPU-second", "value": one.get(k, {}).get("median_gb_per_middle_cpu_s"), "skipped": one.get(k, {}).get("skipped")}
      for k, b in (("naive", "naive-relay"), ("openssh", "openssh-jump-host"), ("rathole", "rathole"), ("proxy", "gatehouse-proxy"), ("proxy-epoll", "gatehouse-proxy-epoll")) if k in one],
    *[{"scenario": "download", "baseline": b, "unit": u, "value": down.get(k, {}).get(f), "skipped": down.get(k, {}).get("skipped")}
      for k, b in (("direct", "direct"), ("naive", "naive-relay"), ("openssh", "openssh-jump-host"), ("rathole", "rathole"), ("proxy", "gatehouse-proxy"), ("proxy-epoll", "gatehouse-proxy-epoll"), ("proxy-cubic", "gatehouse-proxy-cubic")) if k in down
      for u, f in (("GB/s", "median_gb_per_s"), ("GB per middle-box CPU-second", "median_gb_per_middle_cpu_s")) if k != "direct" or f == "median_gb_per_s"],
    {"scenario": "tunnels", "baseline": "gatehouse-proxy", "unit": "tunnels held", "value": tun["tunnels_held"]},
    {"scenario": "tunnels", "baseline": "gatehouse-proxy", "unit": "KiB proxy RSS per idle tunnel", "value": tun["proxy_kib_per_tunnel"]},
    {"scenario": "tunnels", "baseline": "gatehouse-proxy", "unit": "tunnels connected per second", "value": tun["connects_per_second"]},
    {"scenario": "tunnels", "baseline": "gatehouse-proxy-quic-tunnels", "unit": "KiB proxy RSS per idle tunnel", "value": (tunq or {}).get("proxy_kib_per_tunnel")},
    {"scenario": "tunnels", "baseline": "gatehouse-proxy-quic-tunnels", "unit": "tunnels connected per second", "value": (tunq or {}).get("connects_per_second")},
    {"scenario": "tunnels", "baseline": "gatehouse-proxy", "unit": "% of a core while idle", "value": tun["proxy_idle_cpu_percent"]},
    {"scenario": "logins", "baseline": "gatehouse-auth", "unit": "logins/s", "value": logins["logins_per_s"]},
    *[{"scenario": "latency", "baseline": "gatehouse-proxy" if l["path"] == "proxy" else "direct", "unit": f"p99 µs at {rate}/s", "value": l["p99_us"]} for rate, ls in lat.items() for l in ls],
    *[{"scenario": "sessions", "baseline": ("gatehouse-proxy" if s["path"] == "proxy" else "direct") + ("-resumed" if s.get("resumption") else ""), "unit": "sessions/s", "value": s["sessions_per_s"]} for s in ses.values()],
    {"scenario": "sessions", "baseline": "gatehouse-proxy", "unit": "sessions per proxy CPU-second", "value": ses.get("proxy", {}).get("sessions_per_middle_cpu_s")},
    {"scenario": "sessions", "baseline": "gatehouse-proxy-resumed", "unit": "sessions per proxy CPU-second", "value": ses.get("proxy (resumed)", {}).get("sessions_per_middle_cpu_s")},
    *[{"scenario": "sessions-one-worker", "baseline": f"gatehouse-proxy-{b}" + ("-resumed" if s.get("resumption") else ""), "unit": "sessions per proxy CPU-second", "value": s.get("sessions_per_middle_cpu_s")}
      for b, m in ses1.items() for k, s in m.items() if k.startswith("proxy")],
    {"scenario": "logins", "baseline": "gatehouse-auth", "unit": "p99 ms", "value": logins["p99_ms"]},
    *[{"scenario": f"lossy-link-{m['loss_pct']:g}pct", "baseline": f"gatehouse-proxy-{m['transport']}-tunnels" + (f"-{host_cc}" if m["transport"] == "tls" else ""), "unit": u, "value": m[f]}
      for m in (link_all or {"medians": []})["medians"] for u, f in (("download Mbit/s", "download_mbit_per_s"), ("p99 µs", "p99_us"))],
    *[{"scenario": f"lossy-link-{m['loss_pct']:g}pct", "baseline": f"gatehouse-proxy-{m['transport']}-tunnels" + (f"-{host_cc}" if m["transport"] == "tls" else ""), "unit": "p99 µs with a download beside", "value": m["loaded"]["p99_us"]}
      for m in (link_all or {"medians": []})["medians"] if m.get("loaded")],
    *[{"scenario": f"lossy-link-{m['loss_pct']:g}pct", "baseline": "gatehouse-proxy-tls-tunnels-host-cubic", "unit": u, "value": m[f]}
      for m in (link_cubic or {"medians": []})["medians"] for u, f in (("download Mbit/s", "download_mbit_per_s"), ("p99 µs", "p99_us"))],
]
results += renewal_results(renewal_runs())
results = [{k: v for k, v in x.items() if k != "skipped" or v} for x in results]
json.dump({"date": date, "commit": commit, "machine": machine, "results": results,
           "raw": {"epoll": epoll, "ssh": ssh_all, "recordings": opt("recordings.json"), "throughput": thr, "download": down_all, "throughput_host_cubic": hcc_all, "tunnels": tun_all, "tunnels_quic": tunq_all, "link": link_all, "link_host_cubic": link_cubic, "logins": logins, "renewals": renewal_runs(), "latency": latsum, "sessions": ses_all, "sessions_one_worker": ses1, "criterion": crit}},
          open(json_path, "w"), indent=2)

def recordings_section():
    rec = opt("recordings.json")
    if not rec:
        return "## Session recordings\n\nNot run (`loadgen recordings`).\n"
    g = rec["ingest"]
    on, off, r = rec.get("overhead_on_cpu_s"), rec.get("overhead_off_cpu_s"), rec.get("overhead_ratio")
    rows = "\n".join(f"| {o['round'] + 1} | {'on' if o['recording'] else 'off'} | {o['mb']:.0f} | {o['seconds']:.2f} | {o['agent_cpu_s']:.2f} |" for o in rec["overhead"])
    over = (f"Median agent CPU: **{on:.2f} s recording, {off:.2f} s not: {(r - 1) * 100:+.1f} %** (goal: at most +5 %)." if r else "Not run.")
    return f"""## Session recordings (`loadgen recordings --sessions {g['sessions']} --rate-kb {g['rate_kb_per_s']}`)

{g['sessions']} recorded PTY sessions at once through the Proxy to one real agent, each printing
{g['rate_kb_per_s']} KB/s of log-like text: {g['ok']} ran, {g['errors']} errors. While every session
printed ({g['steady_s']:.1f} s window), **Auth used {g['auth_core_pct_steady']:.1f} % of one core** (goal:
at most 10 %). {g['printed_mb']:.1f} MB printed became {g['recorded_mb']:.1f} MB of recordings:
**{g['mb_recorded_per_auth_cpu_s']:.1f} MB per Auth CPU-second** over the whole run; {g['complete']} recordings
complete {g['completion_s']:.1f} s after the last session ended ({g['recordings_per_s']:.0f} recordings/s from the first session's end);
the agent grew by {g['agent_rss_kib_per_session']:.0f} KiB per session (the whole session, SSH and PTY
included).

One session printing {rec['overhead'][0]['mb'] if rec['overhead'] else 0:.0f} MB (`cat` of a file) on a cluster that records and one with
`mode = "off"`, interleaved; the agent's own CPU (its `cat` not counted):

| round | recording | MB | seconds | agent CPU-s |
|---|---|---|---|---|
{rows}

{over}
"""


md = f"""# Benchmark results

Generated by `scripts/bench` — do not edit by hand.

- Date: {date}
- Commit: `{commit}` (the tree the binaries were built from)
- Machine: {machine} (shared and noisy: see `../shared/BENCHMARKS.md`; compare ratios, not absolutes)
- Build: `cargo build --release --bins`; every number below comes from that build.
- TCP congestion control: {host_cc} (the host's default, for every process unless a row says otherwise)

## Throughput: client → middle → sink, 4 TLS streams (`loadgen throughput --streams 4 --duration 5s --runs 3`)

Medians of 3 rounds; each round runs every path once, in turn, so drift on this shared machine
touches all paths alike. Every path starts with TLS from the client: **direct** is one TLS hop to the
sink (the ceiling); **naive** is `bench/src/bin/naive_relay.rs` (per-connection tokio +
tokio-rustls, terminate and re-encrypt); **proxy** is Gatehouse (TLS in, session moved to the
tunnel's core, tunnel TLS out to a simulated agent that discards); **OpenSSH jump host** is a
real `sshd` on loopback with one `ssh -W sink` client per stream (aes128-gcm; the sink's TLS runs
end to end inside the SSH channel, so sshd does one cipher pass per byte where the proxy does
two); **rathole** is rathole 0.5 (`cargo install rathole`) with its TLS transport (visitor TCP in
at the server, TLS data channel to its client, which connects to the sink: the server does one
cipher pass per byte; between its client and server native-tls negotiates TLS 1.2 with
ECDHE-ECDSA-CHACHA20-POLY1305, as `../shared/BENCHMARKS.md` says, which lists 0.61–0.75 GB per
server CPU-second for it where this machine measures more). CPU is the middle box's from
`/proc/<pid>/stat`, all threads, plus its child processes (sshd serves each connection in
children) — for rathole the server's only.

| path | GB/s | GB per middle-box CPU-second | proxy ÷ path (GB/s) | proxy ÷ path (per CPU-s) |
|---|---|---|---|---|
| direct | {d.get('median_gb_per_s', 0):.3f} | — | {ratio(p.get('median_gb_per_s'), d.get('median_gb_per_s'))} | — |
| naive relay | {n.get('median_gb_per_s', 0):.3f} | {n.get('median_gb_per_middle_cpu_s') or 0:.2f} | {ratio(p.get('median_gb_per_s'), n.get('median_gb_per_s'))} | {ratio(p.get('median_gb_per_middle_cpu_s'), n.get('median_gb_per_middle_cpu_s'))} |
{baseline_row("OpenSSH jump host (`ssh -W`, aes128-gcm)", o)}
{baseline_row("rathole (TLS transport)", r)}
| **gatehouse proxy** ({p.get('proxy_io_backend') or '?'}) | {p.get('median_gb_per_s', 0):.3f} | {p.get('median_gb_per_middle_cpu_s') or 0:.2f} | 1.00× | 1.00× |
| gatehouse proxy, agent tunnels over QUIC ({pq.get('proxy_io_backend') or '?'}) | {pq.get('median_gb_per_s', 0):.3f} | {pq.get('median_gb_per_middle_cpu_s') or 0:.2f} | {ratio(p.get('median_gb_per_s'), pq.get('median_gb_per_s'))} | {ratio(p.get('median_gb_per_middle_cpu_s'), pq.get('median_gb_per_middle_cpu_s'))} |
| gatehouse proxy ({pe.get('proxy_io_backend') or 'epoll'}) | {pe.get('median_gb_per_s', 0):.3f} | {pe.get('median_gb_per_middle_cpu_s') or 0:.2f} | {ratio(p.get('median_gb_per_s'), pe.get('median_gb_per_s'))} | {ratio(p.get('median_gb_per_middle_cpu_s'), pe.get('median_gb_per_middle_cpu_s'))} |
| gatehouse proxy, `--proxy-tcp-congestion cubic` ({pc.get('proxy_io_backend') or '?'}) | {pc.get('median_gb_per_s', 0):.3f} | {pc.get('median_gb_per_middle_cpu_s') or 0:.2f} | {ratio(p.get('median_gb_per_s'), pc.get('median_gb_per_s'))} | {ratio(p.get('median_gb_per_middle_cpu_s'), pc.get('median_gb_per_middle_cpu_s'))} |

**QUIC tunnels**: the same proxy with the simulated agents' tunnels over QUIC (quinn; the
tunnel's frames on one bidirectional stream, each session on a QUIC stream of its own) instead
of TCP + TLS; users still reach the proxy over TLS, so the
proxy decrypts TLS and encrypts QUIC packets. Every proxy worker runs a QUIC endpoint (the kernel
steers datagrams to a connection's worker by connection ID); this scenario has one agent, so one
tunnel and one worker carry the streams.

**Congestion control**: every row above runs on the host's default ({host_cc}), except the
`--proxy-tcp-congestion cubic` row, where the proxy's own connections (the users' and the tunnel)
run cubic and everything else, the generator included, keeps {host_cc}. The verdicts use the
default rows; "The host on cubic" below shows what pacing costs every path.

The generator (clients, sink and simulated agents) runs on the same 2 cores; runs where it was
saturated are flagged in `results.json`.

## One session end to end: a single stream (`loadgen throughput --streams 1 --duration 5s --runs 3`)

One TLS connection from one client, through the proxy and one tunnel to the simulated agent,
beside one TLS connection straight to the sink and one through each baseline (as above); medians
of 3 interleaved rounds. A single stream leans on flow control: the tunnel's stream window grows
while the agent keeps up (receive-window auto-tuning).

""" + one_table() + f"""

## Download: source → middle → client, 4 TLS streams (`loadgen throughput --direction download --streams 4 --duration 5s --runs 3`)

The other way: each client sends one byte and then only reads, and a source behind each path
sends as fast as the client reads (for the proxy, an app of the simulated agent: at the proxy
tunnel TLS in, TLS out; for the baselines the TLS sink turned source). Medians of 3 interleaved
rounds; the ratios in the last column are the proxy's download figure over each path's.

""" + one_table(down) + host_cubic_section() + link_section() + f"""

## Latency: 64-byte echo, 32 sessions (`loadgen latency --sessions 32 --rate R --duration 6s --runs 3`)

The requests' slots are evenly spaced over the sessions (at 20,000/s one every 50 µs) and fired by
a pacer thread sleeping with 1 ns timer slack. (Runs before commit 2608273 paced with tokio's
1 ms timers, which fired twenty requests together each millisecond at 20,000/s: their tails, about
1.4 ms even direct, measured how fast a burst drained.) A request whose slot came while the
previous one of its session was still outstanding is timed from its slot (coordinated omission
corrected); otherwise from when it was sent. The echo is a TLS server (direct) or a simulated
agent behind the proxy, so the proxy path adds the proxy and one more hop through the agent.
Generator, echo, agent and proxy share the 2 cores. Three rounds per rate, each the direct path
then the proxy path on the same cluster; each cell is the median over the rounds.

| rate | path | p50 µs | p99 µs | p99.9 µs | max µs |
|---|---|---|---|---|---|
""" + "".join(f"| {rate}/s | {l['path']} | {l['p50_us']} | {l['p99_us']} | {l['p999_us']} | {l['max_us']} |\n" for rate, ls in lat.items() for l in ls) + """
Added by the proxy, the median of the rounds' own differences (each round's proxy run minus the
direct run just before it): """ + "; ".join(f"at {rate}/s p50 {added(sm, 'p50_us')} µs (rounds {rounds_of(sm, 'p50_us')}), p99 {added(sm, 'p99_us')} µs (rounds {rounds_of(sm, 'p99_us')})" for rate, sm in latsum.items()) + """.

## Sessions: new session setup (`loadgen sessions --concurrency 8 --duration 3s --runs 3`)

TLS handshake + (proxy: session request, route, stream open through the tunnel) + one byte echoed.
Full: every session is a new client (new TLS config), so every handshake is a full one (the
proxy signs, verifies the client's signature, X25519). Resumed: one client opens all sessions
(as one `gsh proxy tcp` does) and resumes with the ticket of its previous session (X25519 only;
the proxy still checks the certificate's expiry on each). The proxy sends one stateless ticket
per connection in both cases. Three rounds, each running every row once in turn: rates and
latencies are medians over the rounds, session counts their sums.

| path | sessions/s | resumed | p50 ms | p99 ms | per proxy CPU-second |
|---|---|---|---|---|---|
""" + "".join(f"| {p} | {s['sessions_per_s']:.0f} | {s.get('resumed', 0)} of {s['sessions']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {per_cpu(s)} |\n" for p, s in ses.items()) + one_core_sessions() + f"""
## I/O backends side by side: io_uring and epoll

The same proxy binary, `--proxy-io-backend io_uring` (everything above) and `epoll`. Throughput:
both are paths of the same interleaved rounds above. Latency, sessions and tunnels: the epoll
pass ran right after the io_uring pass in the same `scripts/bench` run.

""" + backend_table() + "\n" + zc_section() + f"""

## SSH: real sessions, a bastion beside them, and OpenSSH's scp (`loadgen ssh --concurrency 8 --duration 5s --runs 3`)

Three paths, measured in turn in each of 3 rounds; each cell is the median over the rounds.
**Gatehouse**: TCP + TLS to the Proxy, through the agent's tunnel, to a **real agent process**.
**ProxyJump**: the bastion Gatehouse replaces: the same client through a jump `sshd`
(`direct-tcpip`, as `ssh -J` does) to a target `sshd`. **Direct**: straight to that target sshd.
Both sshds are real OpenSSH on loopback, trust the cluster's user CA and use aes128-gcm; the
agent negotiates the same. First a russh client with the user's certificate opens sessions back
to back from 8 workers (handshakes, certificate auth, `exec true`, exit status, close), then
uploads one channel into `cat > /dev/null` for 5 s. Server CPU: Proxy + agent with what they
start, jump sshd + target sshd trees, or the one sshd tree.

| path | sessions/s | p50 ms | p99 ms | sessions per server CPU-second | bulk GB/s | bulk GB per server CPU-second |
|---|---|---|---|---|---|---|
""" + "".join(ssh_row(m) + "\n" for m in ssh.values()) + """
Then the **real OpenSSH client**: `scp` (SFTP mode, its default) of a 1 GiB file to `/dev/null`
on the far side: through Gatehouse with the block `gsh config` prints (ProxyCommand
`gsh proxy ssh`), with `scp -J` through the jump sshd, and direct. Client CPU is `scp` with
everything it starts (`ssh`, the ProxyCommand, the jump's `ssh -W`).

| path | seconds | GB/s | server CPU s | GB per server CPU-second | client CPU s |
|---|---|---|---|---|---|
""" + "".join(scp_row(m) + "\n" for m in scp.values()) + """
""" + ssh_goal() + f"""

A byte through Gatehouse takes four AES-GCM passes on the server side (TLS from the client
opened at the Proxy, sealed again into the agent's tunnel, opened at the agent, then the SSH
layer opened), where a jump host takes two (its own SSH layer, then the target's): {ssh_gap_words()}. OpenSSH's sshd forks and
re-executes itself per connection (privilege separation), which dominates its session cost; the
agent serves sessions in-process and forks only the command.

{recordings_section()}
## Tunnels: idle agents on one proxy (`loadgen tunnels --count 15000 --procs 2 --identities 16 --hold 5s --runs 3`)

Three rounds per transport, each on a freshly started cluster; each cell is the median over the
rounds (held: the fewest, failed: the most). KiB per idle tunnel by round: over TLS """ + ", ".join(f"{r['proxy_kib_per_tunnel']:.1f}" for r in tun_all["rounds"]) + (" (epoll " + ", ".join(f"{r['proxy_kib_per_tunnel']:.1f}" for r in epoll["tunnels"]["rounds"]) + ")" if epoll["tunnels"] else "") + ("; over QUIC " + ", ".join(f"{r['proxy_kib_per_tunnel']:.1f}" for r in tunq_all["rounds"]) if tunq_all else "") + f""".

| tunnels held | failed | connect rate | proxy RSS before → after | per idle tunnel | proxy CPU while idle |
|---|---|---|---|---|---|
| over TLS: {tun['tunnels_held']} of {tun['tunnels_requested']} | {tun['failures']} | {tun['connects_per_second']:.0f}/s | {tun['proxy_rss_before_kib']/1024:.1f} → {tun['proxy_rss_after_kib']/1024:.1f} MiB | **{tun['proxy_kib_per_tunnel']:.1f} KiB** | {tun['proxy_idle_cpu_percent']:.1f} % of a core |
""" + (f"""| over QUIC: {tunq['tunnels_held']} of {tunq['tunnels_requested']} | {tunq['failures']} | {tunq['connects_per_second']:.0f}/s | {tunq['proxy_rss_before_kib']/1024:.1f} → {tunq['proxy_rss_after_kib']/1024:.1f} MiB | {tunq['proxy_kib_per_tunnel']:.1f} KiB | {tunq['proxy_idle_cpu_percent']:.1f} % of a core |
""" if tunq else "") + f"""

Simulated agents speak the real protocol over real TLS with real joined certificates (16
identities shared by the 15,000 tunnels: the proxy holds every tunnel; routing picks the newest per
host), from two generator processes on 127.0.0.10 and 127.0.0.11, heartbeating every 30 s.

## Auth: password logins (`loadgen logins --spawn --concurrency 8 --duration 8s`)

| logins/s | p50 ms | p99 ms | logins per Auth CPU-second | Auth RSS |
|---|---|---|---|---|
| {logins['logins_per_s']:.1f} | {logins['p50_ms']:.1f} | {logins['p99_ms']:.1f} | {logins.get('logins_per_auth_cpu_s') or 0:.1f} | {(logins.get('auth_rss_kib') or 0)/1024:.1f} MiB |

argon2id (19 MiB, t=2, p=1) bounds password logins by design.

{renewals_section()}
{audit_section()}
{restart_section()}
{leaves_section()}
## Micro-benchmarks (criterion: `cargo bench -p gatehouse-bench --bench signing` and `--bench tunnel`)

| benchmark | median |
|---|---|
""" + "".join(f"| `{k}` | {v} |\n" for k, v in sorted(crit.items())) + f"""
## Instruction counts (`scripts/icount`, callgrind)

{icount}

Repeatable to the instruction for the same binary, whatever else the machine is doing: compare
this number across commits to judge the codec and the forwarding state machine.

## Flame graphs

`scripts/flamegraph SCENARIO` records the Proxy with `perf` (cpu-clock, DWARF call graphs) while a
loadgen scenario runs; the SVGs and a self-time summary (`.top.txt`) are in `flamegraphs/`, named
with the commit.
"""
open(md_path, "w").write(md)
