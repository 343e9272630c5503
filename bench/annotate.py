"""Benchmark: the annotate stage against the stand-in judge. Prints figures; asserts nothing.

1. throughput: `--requests` judge requests (default 10,000) at each `--concurrency` (64 and
   256) against a stand-in answering after `--latency` seconds (0.1), `--repeats` times (3;
   medians printed), each client a fresh process against a fresh stand-in:
   - reference: the smallest raw client (aiohttp, bodies ready, answers read and dropped: no
     SDK, no ledger, no parsing) sending annotate's very requests (same bodies, same headers):
     the limit of this machine for this server;
   - annotate in one process (`rlhf annotate`), and in two (`--shard i --num-shards 2`, half
     the concurrency each, then `--merge`, timed apart).
   Printed: requests/s over the sending loop and over the whole command (start to exit:
   imports, dataset, report), client and server CPU per request (the processes' own
   rusage, /proc/<pid>/stat for the server), the ideal min(concurrency / latency, 1 / server
   CPU per request), and annotate / reference (goal >= 0.95; client CPU <= 1.5 ms a request).
2. rerun: a finished run of `--rerun-requests` (100,000) requests, run again with --force,
   `--repeats` (3) times, each a fresh `rlhf annotate --force` process: the command's seconds
   and the requests the stand-in received (goal < 10 s, 0 sent). The ledger of that run is
   filled in-process with the stand-in's own answers, so the bench does not spend minutes making
   it. `--profile-rerun FILE` adds one --force under cProfile and prints its top functions.
3. memory: for each count in `--memory-requests` (20,000 and 100,000), a fresh `rlhf annotate`
   process really sends that many requests (latency 0): its peak resident memory (the kernel's
   high-water mark, taken through a small launcher: see PEAK_LAUNCHER) and its RSS at each
   quarter, `--repeats` times; goal: the 100,000 peak
   within 15 % of the 20,000 one, and under 512 MiB.
4. tokens per annotated prompt in each mode (faithful, structured, compact) on 40 prompts.
5. fleet: `--fleet-requests` (1,600) requests on 1, 2 and 4 stand-ins (`base_urls`), each
   answering at most `--fleet-server-concurrency` (8) at once after `--latency` seconds, the
   judge's max_concurrency that many per server: requests per second, the share each server
   got, and the server-bound ideal (servers x per-server concurrency / latency). On one
   machine every stand-in shares its cores with the client: past a point more servers only
   add CPU contention.

    python bench/annotate.py                  # everything, about ten minutes on 2 cores
    python bench/annotate.py --only throughput,modes --requests 4000 --repeats 1
    python bench/annotate.py --only fleet --fleet-requests 800
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANSWERS = [
    "Light is caught by chlorophyll, water is split, and carbon dioxide is fixed into sugar. I am fairly confident.",
    "Sugar.",
    "Basically plants sort of use light and stuff, I guess.",
    "Plants convert light energy into chemical energy stored in glucose, releasing oxygen as a by-product.\n\n"
    "1. Light reactions.\n2. The Calvin cycle.",
]


def write_sets(path: Path, prompts: int) -> Path:
    with open(path, "w") as handle:
        for i in range(prompts):
            handle.write(json.dumps({
                "source": "evol_instruct", "instruction": f"Question {i}: explain photosynthesis step {i % 97}.",
                "completions": [{"model": f"m{j}", "principle": "helpfulness", "custom_system_prompt": "",
                                 "response": f"{a} (variant {i})"} for j, a in enumerate(ANSWERS)],
            }) + "\n")
    return path


def recipe(tmp: Path, sets: Path, base_url: str | list[str], run: str, concurrency: int, **annotation):
    import yaml

    from pipeline.stages import load_recipe

    servers = {"base_urls": base_url} if isinstance(base_url, list) else {"base_url": base_url}
    data = {"stage": "annotate", "run": {"name": run, "root": str(tmp / "runs")},
            "inputs": {"completions": str(sets)},
            "annotation": {"judge": {"name": "standin-judge", "backend": "openai", **servers,
                                     "max_concurrency": concurrency, "timeout_s": 60, "max_retries": 3},
                           "prices": {"standin-judge": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
                           **annotation}}
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def quiet(fn, *args, **kwargs):
    """Run a stage with its per-item progress bar and prints sent to /dev/null."""
    import contextlib
    import io

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def pipeline_root() -> Path:
    """The checkout whose `pipeline` package is imported: client processes run from it."""
    import pipeline

    return Path(pipeline.__file__).resolve().parent.parent


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reference_requests(r) -> list[tuple[str, bytes]]:
    """(ledger key, body) of every first request annotate sends for recipe `r`: its own plan,
    templates and encoding, so the reference client sends byte for byte the same bodies."""
    from pipeline.judge import session
    from pipeline.llm import transport
    from pipeline.stages import annotate

    rows = annotate.load_rows(r)
    requests = session.Requests(rows, r)
    out = []
    for item in session.plan(rows, r):
        messages, params = requests.first(item)
        body = transport.chat_body(r.annotation.judge_model, messages, params)
        out.append((requests.key(messages, params), transport.encode(body)))
    return out


async def reference_client(base_url: str, requests: list[tuple[str, bytes]], concurrency: int) -> None:
    """The smallest client: `concurrency` workers posting ready bodies, answers read and dropped."""
    import asyncio

    import aiohttp

    url = base_url.rstrip("/") + "/chat/completions"
    pending = iter(requests)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker():
            for key, body in pending:
                async with session.post(url, data=body, headers={
                        "Authorization": "Bearer EMPTY", "Content-Type": "application/json",
                        "Accept": "application/json", "X-Request-Key": key}) as response:
                    await response.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def reference_main(path: str, base_url: str, concurrency: int) -> None:
    """`--reference-client FILE`: the reference client as its own process; prints its loop time."""
    import asyncio

    requests = []
    with open(path, "rb") as handle:
        for line in handle:
            key, body = line.rstrip(b"\n").split(b"\t", 1)
            requests.append((key.decode(), body))
    started = time.monotonic()
    asyncio.run(reference_client(base_url, requests, concurrency))
    print(json.dumps({"loop_s": time.monotonic() - started}))


def run_processes(commands: list[list[str]], cwd: Path, env: dict, server) -> dict:
    """Run client processes at once; wall seconds until the last exits, their CPU seconds
    (rusage), the server's CPU seconds meanwhile, and each one's stdout."""
    outs = [tempfile.TemporaryFile() for _ in commands]
    server_before = process_cpu_s(server.process.pid)
    started = time.monotonic()
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=out, stderr=subprocess.DEVNULL) for c, out in zip(commands, outs)]
    cpu = 0.0
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(proc.args)} exited with {proc.returncode}")
    wall = time.monotonic() - started
    texts = []
    for out in outs:
        out.seek(0)
        texts.append(out.read().decode())
        out.close()
    return {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": process_cpu_s(server.process.pid) - server_before,
            "stdout": texts}


def throughput_once(tmp: Path, sets: Path, requests: int, concurrency: int, latency: float, tag: str) -> dict:
    """One run of each client against its own fresh stand-in: figures by client name."""
    from pipeline.standin import start_standin

    root = pipeline_root()
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    out = {}
    for client in ("reference", "annotate x1", "annotate x2"):
        with start_standin(tmp / f"s-{tag}-{client[-2:]}", latency_s=latency, max_concurrency=100_000) as server:
            if client == "reference":
                r = recipe(tmp, sets, server.base_url, f"ref-{tag}", concurrency)
                bodies = tmp / f"ref-{tag}.tsv"
                with open(bodies, "wb") as handle:
                    for key, body in reference_requests(r):
                        handle.write(key.encode() + b"\t" + body + b"\n")
                ran = run_processes([[sys.executable, str(Path(__file__).resolve()), "--reference-client", str(bodies),
                                      "--url", server.base_url, "--concurrency", str(concurrency)]], root, env, server)
                loop = json.loads(ran["stdout"][0])["loop_s"]
            else:
                n = int(client[-1])
                name = f"{client[-2:]}-{tag}"
                recipe(tmp, sets, server.base_url, name, concurrency // n)
                cli = [sys.executable, "-m", "pipeline", "annotate", str(tmp / f"{name}.yaml")]
                shards = [[] if n == 1 else ["--shard", str(i), "--num-shards", str(n)] for i in range(n)]
                ran = run_processes([cli + extra for extra in shards], root, env, server)
                stage = tmp / "runs" / name / "annotate"
                loop = max(json.loads(p.read_text())["seconds"] for p in stage.glob("shard-*/_SUCCESS"))
                if n > 1:
                    merged = run_processes([cli + ["--merge", "--num-shards", str(n)]], root, env, server)
                    ran["merge_s"] = merged["wall_s"]
            sent = server.stats()["requests_total"]
        out[client] = {"sent": sent, "loop_rps": sent / loop, "whole_rps": sent / ran["wall_s"],
                       "client_ms": 1e3 * ran["cpu_s"] / sent, "server_ms": 1e3 * ran["server_cpu_s"] / sent,
                       "merge_s": ran.get("merge_s")}
    return out


def bench_throughput(tmp: Path, requests: int, concurrencies: list[int], latency: float, repeats: int) -> None:
    from statistics import median

    sets = write_sets(tmp / "throughput.jsonl", max(1, requests // 8))
    for concurrency in concurrencies:
        loads = [os.getloadavg()[0]]
        runs = []
        for i in range(repeats):
            runs.append(throughput_once(tmp, sets, requests, concurrency, latency, f"c{concurrency}-{i}"))
            loads.append(os.getloadavg()[0])
        med = {client: {k: median(r[client][k] for r in runs) if runs[0][client][k] is not None else None
                        for k in runs[0][client]} for client in runs[0]}
        server_rps = 1e3 / med["reference"]["server_ms"]
        ideal = min(concurrency / latency, server_rps)
        print(f"throughput: {med['reference']['sent']:.0f} requests at concurrency {concurrency}, latency {latency:g} s; "
              f"medians of {repeats}; load average {', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores")
        print(f"  {'client':<16}{'req/s loop':>12}{'req/s whole':>13}{'/ reference':>13}{'client ms/req':>15}"
              f"{'server ms/req':>15}")
        for client, m in med.items():
            ratio = m["loop_rps"] / med["reference"]["loop_rps"]
            merge = f"  (then --merge: {m['merge_s']:.1f} s)" if m["merge_s"] is not None else ""
            print(f"  {client:<16}{m['loop_rps']:>12.0f}{m['whole_rps']:>13.0f}{ratio:>13.2f}{m['client_ms']:>15.2f}"
                  f"{m['server_ms']:>15.2f}{merge}")
        print(f"  ideal: min({concurrency} / {latency:g} s = {concurrency / latency:.0f}, server CPU "
              f"1 / {med['reference']['server_ms']:.2f} ms = {server_rps:.0f}) = {ideal:.0f} req/s; reference "
              f"{med['reference']['loop_rps'] / ideal:.2f} of it, annotate x1 {med['annotate x1']['loop_rps'] / ideal:.2f}")


def fill_ledger(r, rows_path: Path) -> int:
    """Write the ledger a finished run would have, answering each request in-process."""
    from pipeline.ledger import Ledger
    from pipeline.runs import stage_dir
    from pipeline.judge import session
    from pipeline.stages import annotate
    from pipeline.standin import judge as standin_judge

    rows = annotate.load_rows(r)
    requests = session.Requests(rows, r)
    items = session.plan(rows, r)
    from pipeline.runs import shard_dir

    with Ledger(shard_dir(stage_dir(r), 0, 1) / annotate.LEDGER) as ledger:  # an unsharded run is shard 0 of 1
        for item in items:
            messages, params = requests.first(item)
            prompt = standin_judge.parse_prompt(messages)
            text = standin_judge.answer(prompt, structured=False)
            ledger.record_ok(requests.key(messages, params),
                             {"text": text, "prompt_tokens": 500, "completion_tokens": 100, "finish_reason": "stop"},
                             prompt_id=rows[item.row]["prompt_id"], kind=item.kind)
    return len(items)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "annotate", *args]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} cores"


def bench_rerun(tmp: Path, requests: int, repeats: int, profile: Path | None = None) -> None:
    """A finished run rebuilt with --force, each time in a fresh `rlhf annotate` process: the
    wall-clock of the whole command (interpreter start and imports included), and the requests
    the stand-in received meanwhile."""
    from pipeline.standin import start_standin

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "RLHF_LOG": "WARNING"}
    sets = write_sets(tmp / "rerun.jsonl", max(1, requests // 8))
    with start_standin(tmp / "s2") as server:
        r = recipe(tmp, sets, server.base_url, "rerun", 64)
        started = time.monotonic()
        filled = fill_ledger(r, sets)
        print(f"rerun: ledger of {filled} requests filled in {time.monotonic() - started:.1f} s (setup, not timed)")

        def command(*extra: str, prefix: tuple[str, ...] = ()) -> tuple[float, int]:
            before = server.stats()["requests_total"]
            started = time.monotonic()
            args = cli(str(tmp / "rerun.yaml"), *extra)
            subprocess.run([args[0], *prefix, *args[1:]], check=True, cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.monotonic() - started, server.stats()["requests_total"] - before

        first, sent_first = command()
        print(f"rerun: first run over the filled ledger (every answer replayed) {first:.1f} s, "
              f"{sent_first} requests sent")
        seconds, sent = [], []
        for i in range(repeats):
            note = load_note()
            elapsed, n = command("--force")
            seconds.append(elapsed)
            sent.append(n)
            print(f"rerun: --force #{i + 1}: {elapsed:.1f} s, {n} requests sent ({note})")
        skipped, sent_skip = command()
        if profile is not None:
            command("--force", prefix=("-m", "cProfile", "-o", str(profile)))
        rows = len(annotate_rows(tmp))
    print(f"rerun: --force on a finished {filled}-request run ({rows} rows): median {median(seconds):.1f} s over "
          f"{repeats} fresh processes (goal < 10 s), requests sent {sum(sent)}; the same command without "
          f"--force (stage done, skipped) {skipped:.1f} s, {sent_skip} sent")
    if profile is not None:
        print_profile(profile)


def annotate_rows(tmp: Path) -> list:
    from datasets import load_from_disk

    return load_from_disk(str(tmp / "runs" / "rerun" / "annotate" / "dataset"))


def print_profile(path: Path, top: int = 18) -> None:
    import io
    import pstats

    for order, restrict in (("tottime", ()), ("cumulative", ("pipeline/",))):
        out = io.StringIO()
        pstats.Stats(str(path), stream=out).sort_stats(order).print_stats(*restrict, top)
        lines = [line for line in out.getvalue().splitlines() if line.strip()]
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"rerun: cProfile of one --force by {order}" + (" (the project's functions)" if restrict else "")
              + f", {lines[start - 3 if start >= 3 else 0].strip()}")
        print("\n".join("  " + line for line in lines[start:]))


def rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# Runs a command and writes its peak RSS (kB) to a file. A process started straight from this
# bench would not do: Python starts children with vfork, and exec folds the parent's high-water
# mark into the child's, so after the rerun phase every child "peaked" at this process's size.
# A small launcher in between leaves only its own few MiB to fold in.
PEAK_LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
                 "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                 "sys.exit(code)")


def child_of(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def memory_phase(tmp: Path, requests: int, tag: str) -> tuple[float, list[float], float]:
    """One `rlhf annotate` process that really sends `requests` requests (latency 0): its peak
    resident memory (the kernel's high-water mark, from its launcher's RUSAGE_CHILDREN), its RSS
    at each quarter of the run (sampled every 0.5 s from here) and the seconds it took."""
    from pipeline.standin import start_standin

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "RLHF_LOG": "WARNING"}
    sets = write_sets(tmp / f"memory-{tag}.jsonl", max(1, requests // 8))
    peak_file = tmp / f"memory-{tag}.peak"
    with start_standin(tmp / f"s3-{tag}", max_concurrency=100_000) as server:
        recipe(tmp, sets, server.base_url, f"memory-{tag}", 64)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", PEAK_LAUNCHER, str(peak_file),
                                 *cli(str(tmp / f"memory-{tag}.yaml"))],
                                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples, annotate_pid = [], None
        while proc.poll() is None:
            annotate_pid = annotate_pid or child_of(proc.pid)
            if annotate_pid:
                samples.append(rss_of(annotate_pid))
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        sent = server.stats()["requests_total"]
    if proc.returncode != 0 or sent < requests:
        raise SystemExit(f"memory: the {requests}-request run failed (exit {proc.returncode}, {sent} sent)")
    samples = [s for s in samples if s == s]  # NaN: the process had just ended
    quarters = [samples[min(len(samples) - 1, int(len(samples) * q))] for q in (0.25, 0.5, 0.75, 1.0)] \
        if samples else []
    return int(peak_file.read_text()) / 1024, quarters, elapsed


def bench_memory(tmp: Path, sizes: list[int], repeats: int) -> None:
    peaks: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(repeats):
        for n in sizes:
            note = load_note()
            peak, quarters, elapsed = memory_phase(tmp, n, f"{n}-{i}")
            peaks[n].append(peak)
            print(f"memory: {n} requests sent in {elapsed:.0f} s by a fresh process ({note}); RSS at each quarter "
                  + ", ".join(f"{q:.0f}" for q in quarters) + f" MiB; peak {peak:.0f} MiB")
    medians = {n: median(p) for n, p in peaks.items()}
    print("memory: median peak RSS " + ", ".join(f"{medians[n]:.0f} MiB at {n}" for n in sizes)
          + f" over {repeats} run(s) each")
    if len(sizes) >= 2:
        small, large = medians[sizes[0]], medians[sizes[-1]]
        print(f"memory: the {sizes[-1]}-request peak is {large / small:.2f}x the {sizes[0]}-request one "
              f"(goal <= 1.15, and < 512 MiB)")


def bench_modes(tmp: Path) -> None:
    from pipeline.stages import annotate
    from pipeline.standin import start_standin

    sets = write_sets(tmp / "modes.jsonl", 40)
    with start_standin(tmp / "s4", max_concurrency=1000) as server:
        rows = []
        for mode in ("faithful", "structured", "compact"):
            summary = quiet(annotate.run, recipe(tmp, sets, server.base_url, f"mode-{mode}", 32, mode=mode))
            rows.append((mode, summary["requests_sent_this_run"], summary["tokens_per_prompt"],
                         summary["cost_usd_all_runs"] / 40))
    print("modes (stand-in token counts are words, 4 completions per prompt, critiques included):")
    print(f"  {'mode':<11}{'requests':>9}{'tokens/prompt':>15}{'$/prompt at 2.5/10 per Mtok':>30}")
    for mode, sent, per_prompt, dollars in rows:
        print(f"  {mode:<11}{sent:>9}{per_prompt:>15,.0f}{dollars:>30.5f}")


def bench_fleet(tmp: Path, requests: int, per_server: int, latency: float) -> None:
    from contextlib import ExitStack

    from pipeline.stages import annotate
    from pipeline.standin import start_standin

    sets = write_sets(tmp / "fleet.jsonl", max(1, requests // 8))
    load = os.getloadavg()[0]
    print(f"fleet: {requests} requests per run, {per_server} at once per stand-in, latency {latency:g} s "
          f"(load average {load:.1f} on {os.cpu_count()} cores before the first run)")
    for count in (1, 2, 4):
        with ExitStack() as stack:
            servers = [stack.enter_context(start_standin(tmp / f"fleet-{count}-{i}", latency_s=latency,
                                                         max_concurrency=per_server)) for i in range(count)]
            r = recipe(tmp, sets, [s.base_url for s in servers], f"fleet-{count}", per_server * count)
            started = time.monotonic()
            summary = quiet(annotate.run, r)
            elapsed = time.monotonic() - started
            received = [s.stats()["requests_total"] for s in servers]
        ideal = count * per_server / latency
        achieved = sum(received) / elapsed
        print(f"  {count} server(s): {sum(received)} requests in {elapsed:.1f} s = {achieved:.0f} req/s, ideal "
              f"{ideal:.0f} ({achieved / ideal:.2f}); per server " + ", ".join(map(str, received))
              + f"; client counted {summary['requests_sent_this_run']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="throughput,rerun,memory,modes,fleet")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", default="64,256", help="throughput: one or more, comma-separated")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per throughput figure, of the rerun and of each memory phase (medians printed)")
    parser.add_argument("--reference-client", help=argparse.SUPPRESS)  # FILE: run the reference client only
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--rerun-requests", type=int, default=100_000)
    parser.add_argument("--memory-requests", default="20000,100000",
                        help="request counts of the memory phases, each run in a fresh process")
    parser.add_argument("--profile-rerun", type=Path, help="also run one --force under cProfile, saved here")
    parser.add_argument("--fleet-requests", type=int, default=1_600)
    parser.add_argument("--fleet-server-concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.reference_client:
        reference_main(args.reference_client, args.url, int(args.concurrency))
        return
    parts = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "throughput" in parts:
            bench_throughput(tmp, args.requests, [int(c) for c in args.concurrency.split(",")], args.latency,
                             args.repeats)
        if "rerun" in parts:
            bench_rerun(tmp, args.rerun_requests, args.repeats, args.profile_rerun)
        if "memory" in parts:
            bench_memory(tmp, [int(n) for n in args.memory_requests.split(",")], args.repeats)
        if "modes" in parts:
            bench_modes(tmp)
        if "fleet" in parts:
            bench_fleet(tmp, args.fleet_requests, args.fleet_server_concurrency, args.latency)


if __name__ == "__main__":
    main()
