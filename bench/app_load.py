"""Load on the app: several browser clients at once while a run trains. Does the app stay correct and responsive?

The real app (app.py) runs on a free loopback port with its own home. A short run on the tiny model trains first,
so there is an adapter to chat with; then a long run trains (the one whose tokens/s is watched) and, after a
window with no clients (tokens/s alone), N clients drive the app for S seconds. Each client draws its next action at
random (seeded) and makes it at once when the last one ends (no pause: a stress, harder than N people):
- status: what an open Train page's timer does each second: the run view and the ETA line (/_tick: status,
  progress, charts, log, the ETA line);
- runs: the Runs list (/relist); inspect: the dataset Inspect button (/_inspect_clicked);
- chat: a side-by-side question (/_start, then /_reply, streamed).

Two kinds of client (--client):
- page (the default): a browser tab's own HTTP calls, Gradio's queue protocol (POST queue/join, then the session's
  event stream), with the page's values for every input. It opens the page first: the page's load events attach
  the training run, so each status call draws that run, as a real tab does.
- gradio_client: the gradio_client package, by api_name. Its sessions never run the page's load events, so its
  status calls find no run attached, and it spends about 55 ms of CPU a call (measured: 17 ms in the app), which
  on a 2-core machine the app and the training run lose.

Reported (printed table and JSON):
- errors: calls that raised, by endpoint (goal 0);
- latency p50 / p95 of each action, the status one having a goal (p95 under 1 s);
- the training run's tokens/s alone and under load, from its own metrics events (goal: within 15%);
- the CPU seconds the app, the training run and the clients spent in the load window;
- chat: how many chat calls waited in the queue, and the highest queue position a client was shown (a chat reply
  runs one at a time: ui/chat_tab.py; the queue's estimation messages carry the position the page shows).

    .venv/bin/python bench/app_load.py                          # 20 page clients, 60 s, tiny model
    .venv/bin/python bench/app_load.py --clients 5 --seconds 20 --json out.json
    .venv/bin/python bench/app_load.py --client gradio_client   # the same load through gradio_client
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402 - after the path is set
from core.runs import folder as runs  # noqa: E402
from core.runs import runner  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402
from tests.helpers.training import tiny_config, wait_until_done, write_dataset  # noqa: E402

# what a client does next, and how often: the status timer ticks most, as a page left open does
WEIGHTS = {"status": 0.5, "runs": 0.2, "inspect": 0.15, "chat": 0.15}
GOAL_STATUS_P95_S, GOAL_TOKENS_RATIO = 1.0, 0.85


def start_app(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, LORA_GARAGE_HOME=str(home), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"the app did not answer in 600 s:\n{log.read_text()[-3000:]}")


def tokens_per_s(run_dir: Path, t0: float, t1: float) -> tuple[float | None, int]:
    """Median tokens/s of the run's metrics events written between t0 and t1. -> (median, events)."""
    values = [m[ev.TOKENS_PER_S] for m in ev.metrics(ev.read(run_dir)[0])
              if t0 <= m.get(ev.T, 0) <= t1 and m.get(ev.TOKENS_PER_S)]
    return (statistics.median(values) if values else None), len(values)


class Api:
    """The app's event handlers as the page calls them, from its /config: fn_index, inputs, their page values."""

    def __init__(self, url: str):
        with urllib.request.urlopen(url + "config", timeout=60) as r:
            config = json.load(r)
        self.components = {c["id"]: c for c in config["components"]}
        self.deps = {d["api_name"]: d for d in config["dependencies"] if d.get("api_name")}
        self.loads = [d for d in config["dependencies"] if any(t[1] == "load" for t in d["targets"])]

    def is_state(self, cid: int) -> bool:
        return self.components[cid]["type"] == "state"

    def data(self, dep: dict, *given) -> list:
        """The values a page sends: `given` for the first inputs that are not State (State stays on the server: None),
        each other input its component's value as the page starts."""
        given, out = list(given), []
        for cid in dep["inputs"]:
            if self.is_state(cid):
                out.append(None)
            elif given:
                out.append(given.pop(0))
            else:
                out.append(self.components[cid].get("props", {}).get("value"))
        return out


class Driver:
    """What a client does: draws its next action (WEIGHTS) and makes it as soon as the last one ended."""

    rng: random.Random
    calls: list[dict]

    def run(self, until: float) -> None:
        kinds, weights = zip(*WEIGHTS.items())
        while time.time() < until:
            kind = self.rng.choices(kinds, weights)[0]
            t0 = time.time()
            row = {"kind": kind, "t": t0, "error": None}
            try:
                getattr(self, kind)(row)
            except Exception as e:  # noqa: BLE001 - an error is what this bench counts
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["seconds"] = time.time() - t0
            self.calls.append(row)


class PageClient(Driver):
    """One browser tab: the page's HTTP calls through Gradio's queue (sse_v3), on its own session."""

    def __init__(self, url: str, api: Api, model: str, data: Path, chat_run: str, seed: int):
        import httpx  # gradio's own dependency

        self.http = httpx.Client(base_url=url + "gradio_api/", timeout=httpx.Timeout(600.0))
        self.api, self.session = api, uuid.uuid4().hex
        self.model, self.data, self.chat_run = model, str(data), chat_run
        self.rng = random.Random(seed)
        self.calls: list[dict] = []
        self.wait(*[self.submit(dep, api.data(dep)) for dep in api.loads])  # the page opens: its load events run

    def submit(self, dep: dict, data: list) -> str:
        r = self.http.post("queue/join", json={"data": data, "event_data": None, "fn_index": dep["id"],
                                               "trigger_id": None, "session_hash": self.session})
        r.raise_for_status()
        return r.json()["event_id"]

    def wait(self, *event_ids: str) -> dict:
        """Read the session's event stream until each call has completed -> {event_id: {"data", "rank"}}: its
        outputs (a generator's last, its diffs applied) and the highest queue position it was shown (0: none)."""
        from gradio_client.utils import apply_diff  # how the page applies a streamed output's diffs

        left = set(event_ids)
        out = {e: {"data": None, "rank": 0} for e in event_ids}
        while left:
            with self.http.stream("GET", "queue/data", params={"session_hash": self.session}) as stream:
                for line in stream.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    msg = json.loads(line[5:])
                    kind, eid = msg.get("msg"), msg.get("event_id")
                    if kind == "close_stream" or eid not in out:
                        if kind == "close_stream":
                            break
                        continue
                    if kind == "estimation" and msg.get("rank") is not None:
                        out[eid]["rank"] = max(out[eid]["rank"], int(msg["rank"]) + 1)  # rank 0: next in line
                    elif kind == "process_generating":
                        data = msg["output"]["data"]
                        prev = out[eid]["data"]
                        out[eid]["data"] = data if prev is None else [apply_diff(p, d) for p, d in zip(prev, data)]
                    elif kind == "process_completed":
                        if not msg.get("success", True):
                            raise RuntimeError(f"the app answered an error: {str(msg.get('output'))[:300]}")
                        if out[eid]["data"] is None:
                            out[eid]["data"] = msg["output"].get("data")
                        left.discard(eid)
                        if not left:
                            break
        return out

    def call(self, api_name: str, *given) -> dict:
        """One call -> {"data": its outputs but State's (as gradio_client gives them), "rank": see wait}."""
        dep = self.api.deps[api_name]
        eid = self.submit(dep, self.api.data(dep, *given))
        out = self.wait(eid)[eid]
        shown = [not self.api.is_state(cid) for cid in dep["outputs"]]
        return {**out, "data": [v for v, keep in zip(out["data"] or [], shown) if keep]}

    def status(self, row: dict) -> None:
        # an open Train page's timer: one event a tick, the run view with the ETA line (ui/run_view.wire)
        shown = self.call("_tick")["data"][0]  # the run view's status line
        if "Run **" not in str(shown):
            raise RuntimeError(f"the page shows no run: {str(shown)[:200]}")

    def runs(self, row: dict) -> None:
        self.call("relist", None, [])

    def inspect(self, row: dict) -> None:
        self.call("_inspect_clicked", self.model, self.data)

    def chat(self, row: dict) -> None:
        message = self.rng.choice(["Who are you?", "What is your name?", "Hello!"])
        started = self.call("_start", message, [], [], self.chat_run, "Side by side: base | adapter")["data"]
        left, right = started[1], started[2]
        # as Client.chat: windows, run, checkpoint A, B, mode, system prompt, max new tokens, temperature, top-p,
        # repetition, seed, GGUF
        done = self.call("_reply", left, right, self.chat_run, None, None, "Side by side: base | adapter", "", 16, 0,
                         0.9, 1.1, -1, None)
        right = done["data"][2]
        if not right or not str(right[-1].get("content", "")).strip():
            raise RuntimeError(f"chat gave no reply: {right!r}")
        row["queued_at"] = done["rank"]


class Client(Driver):
    """One browser's worth of calls, on its own gradio_client session (--client gradio_client)."""

    def __init__(self, url: str, model: str, data: Path, chat_run: str, seed: int):
        from gradio_client import Client as GradioClient  # optional: the bench's own dependency

        self.c = GradioClient(url, verbose=False)
        self.model, self.data, self.chat_run = model, str(data), chat_run
        self.rng = random.Random(seed)
        self.calls: list[dict] = []
        info = self.c.view_api(return_format="dict", print_info=False)["named_endpoints"]
        self.inspect_params = [p["label"] for p in info["/_inspect_clicked"]["parameters"]]

    def status(self, row: dict) -> None:
        self.c.predict(api_name="/_tick")

    def runs(self, row: dict) -> None:
        self.c.predict(None, [], api_name="/relist")

    def inspect(self, row: dict) -> None:
        self.c.predict(self.model, self.data, api_name="/_inspect_clicked")

    def chat(self, row: dict) -> None:
        message = self.rng.choice(["Who are you?", "What is your name?", "Hello!"])
        _, left, right = self.c.predict(message, [], [], self.chat_run, "Side by side: base | adapter",
                                        api_name="/_start")
        # windows (as /_start left them; the message itself waits in the session's state), run, checkpoint A, B,
        # mode, system prompt, max new tokens, temperature, top-p, repetition, seed, GGUF: the page's values
        job = self.c.submit(left, right, self.chat_run, None, None, "Side by side: base | adapter", "", 16, 0, 0.9,
                            1.1, -1, None, api_name="/_reply")
        positions = []
        while not job.done():
            st = job.status()
            if st.rank is not None and st.code.name == "IN_QUEUE":
                positions.append(int(st.rank) + 1)  # rank 0 is the first in line: the page shows 1
            time.sleep(0.05)
        left, right = job.result()[1:]
        if not right or not str(right[-1].get("content", "")).strip():
            raise RuntimeError(f"chat gave no reply: {right!r}")
        row["queued_at"] = max(positions) if positions else 0


def cpu_seconds(pid: int | None) -> float | None:
    """A process's CPU time so far (user + system, its threads included), from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="the load window")
    ap.add_argument("--alone", type=float, default=45.0, help="the window before it, training with no clients")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--client", choices=("page", "gradio_client"), default="page",
                    help="page: a browser tab's own calls (default); gradio_client: the gradio_client package")
    args = ap.parse_args(argv)

    root = args.root or Path(tempfile.mkdtemp(prefix="app-load-"))
    root.mkdir(parents=True, exist_ok=True)
    home = root / "home"
    os.environ.update(LORA_GARAGE_HOME=str(home), OMP_NUM_THREADS="1")
    from tests.helpers.tiny import build_tiny_model

    model = str(build_tiny_model(root / "tiny-model"))
    data = write_dataset(root / "identity.jsonl", n=32)
    print(f"app load: {args.clients} clients for {args.seconds:.0f} s, tiny model, in {root}", flush=True)
    chat_run = runner.start(tiny_config(model, data, max_steps=4))  # an adapter to chat with
    st = wait_until_done(runs.get(chat_run), 900)
    if st["state"] != "completed":
        raise SystemExit(f"the run to chat with did not complete:\n{runs.tail_log(runs.get(chat_run), 30)}")
    port = free_port()
    app = start_app(home, port, root / "app.log")
    url = f"http://127.0.0.1:{port}/"
    train_id = None
    try:
        train_id = runner.start(tiny_config(model, data, max_steps=100_000, save_steps=100_000, logging_steps=1))
        train_dir = runs.get(train_id)
        while not ev.metrics(ev.read(train_dir)[0]):  # training has begun: its first metrics event
            if runs.read_status(train_dir)["state"] not in runs.ACTIVE:
                raise SystemExit(f"the training run ended:\n{runs.tail_log(train_dir, 30)}")
            time.sleep(0.5)
        t_alone = time.time()
        time.sleep(args.alone)
        alone = tokens_per_s(train_dir, t_alone, time.time())
        print(f"alone: {alone[0]} tokens/s (median of {alone[1]} steps)", flush=True)
        if args.client == "page":
            api = Api(url)
            clients = [PageClient(url, api, model, data, chat_run, args.seed * 1000 + i) for i in range(args.clients)]
        else:
            clients = [Client(url, model, data, chat_run, args.seed * 1000 + i) for i in range(args.clients)]
        child = runs.read_status(train_dir).get("pid")
        cpu0 = {"app": cpu_seconds(app.pid), "training": cpu_seconds(child), "clients": time.process_time()}
        t_load = time.time()
        until = t_load + args.seconds
        threads = [threading.Thread(target=c.run, args=(until,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + 600)
        t_end = time.time()
        cpu1 = {"app": cpu_seconds(app.pid), "training": cpu_seconds(child), "clients": time.process_time()}
        cpu = {k: round(cpu1[k] - cpu0[k], 1) if cpu0[k] is not None and cpu1[k] is not None else None for k in cpu0}
        loaded = tokens_per_s(train_dir, t_load, min(t_end, until))
        hung = sum(t.is_alive() for t in threads)
        state = runs.read_status(train_dir)["state"]
    finally:
        if train_id and runs.read_status(runs.get(train_id))["state"] in runs.ACTIVE:
            runner.stop(train_id, grace_s=30)
        os.killpg(app.pid, 15)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, 9)
    calls = [c for client in clients for c in client.calls]
    result = summarise(calls, alone, loaded, args, hung, state)
    result["cpu_s"] = cpu  # CPU seconds spent in the load window: the app, the training child, the clients
    # every call, for a look at when the slow ones came: [action, its start in s from the window's, seconds, error]
    result["calls"] = sorted(([c["kind"], round(c["t"] - t_load, 3), round(c["seconds"], 3), c["error"]] for c in calls),
                             key=lambda row: row[1])
    result["status_p95_by_third_s"] = [percentile([c["seconds"] for c in calls if c["kind"] == "status" and not c["error"]
                                                   and k * args.seconds / 3 <= c["t"] - t_load < (k + 1) * args.seconds / 3],
                                                  0.95) for k in range(3)]
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["errors"] == 0 and not hung else 1


def summarise(calls: list[dict], alone, loaded, args, hung: int, state: str) -> dict:
    by = {}
    for kind in WEIGHTS:
        rows = [c for c in calls if c["kind"] == kind]
        ok = [c["seconds"] for c in rows if not c["error"]]
        by[kind] = {"calls": len(rows), "errors": sum(1 for c in rows if c["error"]),
                    "p50_s": percentile(ok, 0.5), "p95_s": percentile(ok, 0.95), "max_s": max(ok, default=None),
                    "first_errors": sorted({c["error"] for c in rows if c["error"]})[:5]}
    chats = [c for c in calls if c["kind"] == "chat" and not c["error"]]
    queued = [c["queued_at"] for c in chats if c.get("queued_at")]
    ratio = loaded[0] / alone[0] if alone[0] and loaded[0] else None
    return {"client": args.client, "clients": args.clients, "seconds": args.seconds, "seed": args.seed, "load_average": os.getloadavg(),
            "errors": sum(b["errors"] for b in by.values()), "hung_clients": hung, "by_endpoint": by,
            "status_p95_s": by["status"]["p95_s"],
            "status_p95_goal_met": by["status"]["p95_s"] is not None and by["status"]["p95_s"] < GOAL_STATUS_P95_S,
            "tokens_per_s_alone": alone[0], "tokens_per_s_loaded": loaded[0], "steps_alone": alone[1],
            "steps_loaded": loaded[1], "tokens_ratio": ratio,
            "tokens_goal_met": ratio is not None and ratio >= GOAL_TOKENS_RATIO,
            "chat_replies": len(chats), "chat_queued": len(queued), "chat_max_position": max(queued, default=0),
            "training_state_after": state}


def print_table(r: dict) -> None:
    print(f"\n{r['clients']} {r['client']} clients, {r['seconds']:.0f} s, load average {', '.join(f'{x:.1f}' for x in r['load_average'])}")
    print(f"{'endpoint':<8} {'calls':>6} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for kind, b in r["by_endpoint"].items():
        f = lambda v: f"{v:7.2f}" if v is not None else f"{'-':>7}"  # noqa: E731
        print(f"{kind:<8} {b['calls']:>6} {b['errors']:>6} {f(b['p50_s'])} {f(b['p95_s'])} {f(b['max_s'])}"
              + (f"  {b['first_errors']}" if b["first_errors"] else ""))
    ratio = f"{r['tokens_ratio']:.2f}" if r["tokens_ratio"] is not None else "-"
    print(f"\nerrors: {r['errors']} (goal 0); hung clients: {r['hung_clients']}")
    if r.get("cpu_s"):
        print("CPU seconds in the load window: " + ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items()))
    if r.get("status_p95_by_third_s"):
        print("status p95 in each third of the window: "
              + ", ".join(f"{v:.2f} s" if v is not None else "-" for v in r["status_p95_by_third_s"]))
    print(f"status p95: {r['status_p95_s']} s (goal under {GOAL_STATUS_P95_S} s: "
          f"{'met' if r['status_p95_goal_met'] else 'MISSED'})")
    print(f"training tokens/s: alone {r['tokens_per_s_alone']} ({r['steps_alone']} steps), under load "
          f"{r['tokens_per_s_loaded']} ({r['steps_loaded']} steps), ratio {ratio} (goal at least {GOAL_TOKENS_RATIO}: "
          f"{'met' if r['tokens_goal_met'] else 'MISSED'})")
    print(f"chat: {r['chat_replies']} replies, {r['chat_queued']} of them waited in the queue and were shown their "
          f"position (1 = next in line), highest position shown {r['chat_max_position']}; training run after: "
          f"{r['training_state_after']}")


if __name__ == "__main__":
    sys.exit(main())
