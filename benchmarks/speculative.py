"""Issue 6 benchmark: speculative decoding through the Draft service, against plain decoding in the same run.

The target engine runs in this process; the draft is a real Draft service in a subprocess, called over
gRPC by the same RemoteDraft client the decode stage uses. Greedy decoding, so every speculative run
must produce exactly the plain run's tokens (checked first, for every task and method).

  1. batch-1 decode speed (tokens after the first / time after the first) for input-grounded tasks
     (summarise a given passage, edit given code) and open-ended chat, for ngram and the self-draft,
     with acceptance rate and mean accepted length (accepted drafts + bonus per verifying step)
  2. cost model: one draft round trip, a verify step of k+1 query tokens vs a 1-token step, and the
     speedup they predict, tokens_per_step / ((T(k+1) + D) / T(1)), against the measured one (fixed k);
     and the draft round trip of a step at 1, 4 and 16 sequences, as the client makes it (one
     ProposeBatch) and as it was made before that RPC (one Propose per sequence, sent together)
  3. throughput vs batch size (default 1 4 16 64) with adaptive k: where speculation switches off; on CUDA
     with verify steps replayed from CUDA graphs and run eagerly (`--verify-graphs both`), in one process

Parts 1 and 3 also run "attached-off", a control: the speculator attached to a draft that never proposes,
so it plans every step (and calls that draft) but never verifies; against "none" it is the per-step cost
of having speculation on at all. Part 1 also runs "ngram-local": the same n-gram proposer inside the
engine's process (a decode worker started without --draft-address), which shows what the RPC costs. Each
variant runs in interleaved rounds after a gc.collect() (a gen-2 collection in a 0.2 s run is a 5-10%
outlier); tables give the median with the spread (min-max) over rounds.

    python benchmarks/speculative.py [--device cpu|cuda] [--smoke] [--verify-graphs on|off|both] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch

from stageserve.common.engine_stage import freeze_heap
from stageserve.draft.client import RemoteDraft
from stageserve.draft.local import LocalDraft
from stageserve.draft.ngram import NgramProposer
from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.engine.loader.default_model import default_model_path
from stageserve.engine.speculative import DraftCall, SpecCounters, expected_tokens
from stageserve.sample.params import SamplingParams
from stageserve.tokenizer.text_tokenizer import load_tokenizer
from stageserve.v1 import draft_pb2

PASSAGE = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. This reef "
    "structure is composed of and built by billions of tiny organisms, known as coral polyps. It supports a "
    "wide diversity of life and was selected as a World Heritage Site in 1981. Climate change, pollution and "
    "crown-of-thorns starfish outbreaks threaten the reef, and mass coral bleaching events have become more "
    "frequent since 2016."
)
CODE = (
    "def load_users(path):\n    users = []\n    with open(path) as f:\n        for line in f:\n"
    "            name, age, email = line.strip().split(',')\n            users.append({'name': name, 'age': int(age), "
    "'email': email})\n    return users\n\n\ndef adults(users):\n    result = []\n    for user in users:\n"
    "        if user['age'] >= 18:\n            result.append(user)\n    return result\n"
)
TASKS = {
    "summarise": f"Summarise this passage in three sentences, reusing its wording:\n\n{PASSAGE}",
    "edit-code": f"Rename the variable `users` to `people` everywhere in this code and print the whole result:\n\n{CODE}",
    "chat": "Write a short story about a robot who learns to paint.",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def draft_server(proposer: str, device: str, layers: int, threads: int, dtype: str = "auto"):
    """A Draft service subprocess; yields its address once it answers a proposal."""
    port = free_port()
    cmd = [sys.executable, "-m", "stageserve.cli", "serve", "draft", "--server-port", str(port),
           "--proposer", proposer, "--draft-layers", str(layers), "--engine-device", device,
           "--engine-dtype", dtype]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        client = RemoteDraft([address], timeout_s=5.0)
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"draft server exited: {proc.stderr.read()[-2000:]}")
            try:
                client.replicas[0].stub.Propose(draft_pb2.ProposeRequest(seq_id="up", new_token_ids=[1, 2], k=1), timeout=2.0)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        client.close()
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


def decode_run(engine, prompts, max_tokens):
    """Greedy decode of every prompt as one batch. Prefill runs first, untimed, then a full collection, so
    no variant carries another's garbage into its timing. Returns (outputs, decode tok/s)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(f"b{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    start, before = time.perf_counter(), sum(len(r.output_token_ids) for r in reqs)
    while any(not r.is_finished for r in reqs):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return [r.output_token_ids for r in reqs], (sum(len(r.output_token_ids) for r in reqs) - before) / elapsed


def spread(values: list[float], digits: int = 1) -> dict:
    """Median and range over rounds."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}  # fmt: skip


def ranged(name: str, values: list[float]) -> dict:
    """A sweep row's columns for one variant: `<name>_tok_s` (the median), `<name>_min`, `<name>_max`."""
    tps = spread(values)
    return {f"{name}_tok_s": tps["median"], f"{name}_min": tps["min"], f"{name}_max": tps["max"]}


def speedups(runs: list[float], plain: list[float]) -> dict:
    """The median run over the median plain run, and the range of round-by-round ratios (the rounds are
    interleaved, so each ratio compares runs made a few seconds apart)."""
    ratios = [a / b for a, b in zip(runs, plain)]
    return {"speedup": round(statistics.median(runs) / statistics.median(plain), 2),
            "speedup_min": round(min(ratios), 2), "speedup_max": round(max(ratios), 2)}  # fmt: skip


class NeverProposes:
    """The draft of the "attached-off" control: it answers every call with no proposal, at no cost."""

    def propose(self, calls):
        return [[] for _ in calls]

    def release(self, seq_id):
        pass


ATTACHED_OFF = "attached-off"
NGRAM_LOCAL = "ngram-local"  # the same n-gram proposer inside the decode process: no RPC (a decode worker without --draft-address)


def verify_replays(engine) -> int:
    graphs = engine.runner.graphs
    return graphs.verify_replays if graphs is not None else 0


def set_verify_graphs(engine, on: bool) -> None:
    """Replay verify steps from their CUDA graphs, or run them eagerly (the graphs stay captured)."""
    if engine.runner.graphs is not None:
        engine.runner.graphs.verify_enabled = on


def spec_stats(engine) -> dict:
    c = engine.speculator.counters
    return {"acceptance_rate": round(c.acceptance_rate, 3), "mean_accepted_length": round(c.mean_accepted_length, 2),
            "proposed": c.proposed, "verifications": c.verifications, "draft_calls": c.draft_calls,
            "draft_ms_per_call": round(1000 * c.draft_seconds / max(c.draft_calls, 1), 3)}  # fmt: skip


# (draft address, speculation knobs) -> the speculator a long-running decode worker would have kept: its
# measured step and draft costs carry over from run to run, as they do across requests in a server.
SPECULATORS: dict = {}
FRESH = False  # --fresh-speculator: a new speculator (nothing measured yet) for every run


def use_draft(engine, draft: str | None, config: EngineConfig):
    """Point the engine at a draft: a Draft server's address, ATTACHED_OFF, NGRAM_LOCAL or None (no speculator).
    Statistics (counters) start fresh for every run."""
    engine.config = engine.scheduler.config = config
    if not draft:
        engine.set_draft(None)
        return
    key = (draft, config.speculative_config())
    if FRESH or key not in SPECULATORS:
        if draft == ATTACHED_OFF:
            engine.set_draft(NeverProposes())
        elif draft == NGRAM_LOCAL:
            engine.set_draft(LocalDraft(NgramProposer()))
        else:
            engine.set_draft(RemoteDraft([draft], timeout_s=2.0))
        SPECULATORS[key] = engine.speculator
    else:
        engine.speculator = SPECULATORS[key]
        engine.speculator.counters = SpecCounters()


def batch1(engine, tokenizer, drafts, base: EngineConfig, args) -> list[dict]:
    rows = []
    targets = {"none": None, ATTACHED_OFF: ATTACHED_OFF, NGRAM_LOCAL: NGRAM_LOCAL, **drafts}
    for task, text in TASKS.items():
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        use_draft(engine, None, base)
        reference, _ = decode_run(engine, [prompt], args.max_tokens)  # warm, and the tokens to match
        runs = {name: [] for name in targets}
        stats = {}
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every method alike
            for name, target in targets.items():
                method = "ngram" if name in (ATTACHED_OFF, NGRAM_LOCAL) else name
                config = dataclasses.replace(base, speculative=method, num_speculative_tokens=args.k)
                use_draft(engine, target, config)
                before = verify_replays(engine)
                out, tps = decode_run(engine, [prompt], args.max_tokens)
                assert out == reference, f"{task}/{name}: speculative output differs from plain greedy"
                runs[name].append(tps)
                if name != "none":
                    stats[name] = {**spec_stats(engine), "verify_graph_replays": verify_replays(engine) - before}
        for name, values in runs.items():
            tps = spread(values)
            rows.append({"task": task, "method": name, "decode_tok_s": tps["median"], "tok_s_min": tps["min"],
                         "tok_s_max": tps["max"], **speedups(values, runs["none"]), **stats.get(name, {})})  # fmt: skip
            print("batch1", json.dumps(rows[-1]), flush=True)
    return rows


def step_time(engine, prompt, k, steps) -> float:
    """Mean seconds of a batch-1 step that verifies k draft tokens (all rejected: the worst case)."""

    class Wrong:
        def propose(self, calls):
            return [[(engine.model_config.vocab_size - 1)] * c.k for c in calls]

        def release(self, seq_id):
            pass

    config = dataclasses.replace(engine.config, speculative="ngram", num_speculative_tokens=max(k, 1), spec_adaptive=False)
    engine.config = engine.scheduler.config = config
    engine.set_draft(Wrong() if k else None)
    params = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    engine.add_request(f"t{k}-{time.monotonic_ns()}", prompt, params)
    engine.step()
    engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished():
        engine.step()
    return elapsed


def cost_model(engine, tokenizer, address, base, args) -> dict:
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": TASKS["edit-code"]}]))
    t = {k: min(step_time(engine, prompt, k, args.cost_steps) for _ in range(2)) for k in (0, args.k)}
    round_trips = draft_round_trips(address, prompt, args)
    rpc = round_trips[0]["batch_rpc_ms"]["mean"] / 1000
    # A fixed-k run on the same task: measured tokens per step against the costs above.
    fixed = dataclasses.replace(base, speculative="ngram", num_speculative_tokens=args.k, spec_adaptive=False)
    use_draft(engine, None, base)
    _, plain = decode_run(engine, [prompt], args.max_tokens)
    use_draft(engine, address, fixed)
    _, spec = decode_run(engine, [prompt], args.max_tokens)
    c = engine.speculator.counters
    tokens_per_step = (c.accepted + c.verifications) / max(c.verifications, 1)
    hit = c.verifications / max(c.draft_calls, 1)  # steps whose draft proposed something
    ratio = t[args.k] / t[0]
    predicted = (hit * tokens_per_step + (1 - hit)) / (hit * ratio + (1 - hit) + rpc / t[0])
    return {"k": args.k, "verify_graphs": args.modes[0], "step_1_token_ms": round(1000 * t[0], 2), f"step_{args.k + 1}_tokens_ms": round(1000 * t[args.k], 2),
            "verify_cost_ratio": round(ratio, 3), "draft_rpc_ms": round(1000 * rpc, 3),
            "acceptance_rate": round(c.acceptance_rate, 3), "tokens_per_verify_step": round(tokens_per_step, 2),
            "draft_hit_rate": round(hit, 3), "expected_tokens_at_acceptance": round(expected_tokens(c.acceptance_rate, args.k), 2),
            "predicted_speedup": round(predicted, 2), "measured_speedup": round(spec / plain, 2),
            "draft_round_trips": round_trips}  # fmt: skip


def draft_round_trips(address, prompt, args) -> list[dict]:
    """A step's draft round trip at each of `args.rpc_batches` sequences, two ways in interleaved rounds:
    RemoteDraft.propose (one ProposeBatch) and one unary Propose per sequence sent together (the client
    before ProposeBatch). Every sequence already holds the prompt; each round sends no new tokens."""
    client = RemoteDraft([address], timeout_s=2.0)
    stub = client.replicas[0].stub
    rows = []
    for n in args.rpc_batches:
        seq_ids = [f"rtt{n}-{i}" for i in range(n)]
        client.propose([DraftCall(s, prompt, args.k, True, None) for s in seq_ids])
        calls = [DraftCall(s, [], args.k, False, 0) for s in seq_ids]
        requests = [draft_pb2.ProposeRequest(seq_id=s, k=args.k, num_accepted=0) for s in seq_ids]
        batched, separate = [], []
        for _ in range(args.rpc_rounds):
            start = time.perf_counter()
            proposals = client.propose(calls)
            batched.append(time.perf_counter() - start)
            assert all(p is not None for p in proposals)
            start = time.perf_counter()
            futures = [stub.Propose.future(r, timeout=2.0) for r in requests]
            for f in futures:
                f.result()
            separate.append(time.perf_counter() - start)
        for s in seq_ids:
            client.release(s)
        rows.append({"sequences": n, "rounds": args.rpc_rounds, "batch_rpc_ms": rtt_ms(batched),
                     "per_sequence_rpcs_ms": rtt_ms(separate)})  # fmt: skip
        print("draft round trip", json.dumps(rows[-1]), flush=True)
    client.close()
    return rows


def rtt_ms(seconds: list[float]) -> dict:
    ms = [1000 * s for s in seconds]
    return {"mean": round(statistics.fmean(ms), 3), **spread(ms, 3)}


def batch_sweep(engine, tokenizer, address, base, args) -> list[dict]:
    """Plain and attached-off against ngram at each batch size, ngram once per verify-graph mode in `args.modes`."""
    grounded = [TASKS["summarise"], TASKS["edit-code"]]
    rows = []
    for size in args.batch_sizes:
        texts = [grounded[i % 2] + ("" if i < 2 else f"\n(copy {i})") for i in range(size)]
        prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
        plain_config = dataclasses.replace(base, num_speculative_tokens=args.k, max_num_seqs=max(size, 1))
        spec_config = dataclasses.replace(plain_config, speculative="ngram")
        use_draft(engine, None, plain_config)
        reference, _ = decode_run(engine, prompts, args.sweep_tokens)  # warm, and the tokens to match
        plain_runs, off_runs, spec_runs, stats = [], [], {mode: [] for mode in args.modes}, {}
        for _ in range(args.rounds):  # interleaved, so drift hits every variant alike; medians below
            use_draft(engine, None, plain_config)
            plain_runs.append(decode_run(engine, prompts, args.sweep_tokens)[1])
            use_draft(engine, ATTACHED_OFF, spec_config)
            off_runs.append(decode_run(engine, prompts, args.sweep_tokens)[1])
            for mode in args.modes:
                set_verify_graphs(engine, mode == "on")
                use_draft(engine, address, spec_config)
                before = verify_replays(engine)
                outs, tps = decode_run(engine, prompts, args.sweep_tokens)
                assert outs == reference, f"batch {size}: speculative output differs"
                spec_runs[mode].append(tps)
                c = engine.speculator.counters
                stats[mode] = {"speculating": size <= base.spec_max_batch_size and c.draft_calls > 0,
                               "acceptance_rate": round(c.acceptance_rate, 3), "verifications": c.verifications,
                               "verify_graph_replays": verify_replays(engine) - before}  # fmt: skip
        off_speedup = speedups(off_runs, plain_runs)
        for mode in args.modes:
            rows.append({"batch": size, "verify_graphs": mode, **ranged("plain", plain_runs),
                         **ranged("attached_off", off_runs), **{f"attached_off_{k}": v for k, v in off_speedup.items()},
                         **ranged("ngram", spec_runs[mode]), **speedups(spec_runs[mode], plain_runs), **stats[mode]})  # fmt: skip
            print("sweep", json.dumps(rows[-1]), flush=True)
        set_verify_graphs(engine, args.modes[0] == "on")
    return rows


def span(row: dict, low: str, high: str) -> str:
    return f"[{row[low]}-{row[high]}]"


def rtt_text(ms: dict) -> str:
    return f"{ms['mean']:.3f}, {ms['median']:.3f} [{ms['min']:.3f}-{ms['max']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, to check the script runs")
    ap.add_argument("--k", type=int, default=6, help="most draft tokens per step")
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per run (default: 256 on CUDA, also in the sweep; 64 on CPU, 16 in its sweep)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per variant (default: 5 on CUDA, 3 on CPU)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--rpc-batches", type=int, nargs="+", default=[1, 4, 16],
                    help="sequences per step at which the cost part times the draft round trip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="engine dtype; float32 on a GPU keeps greedy identity exact")
    ap.add_argument("--skip-model", action="store_true", help="no self-draft (saves its start-up)")
    ap.add_argument("--parts", default="batch1,cost,sweep", help="which of batch1, cost, sweep to run")
    ap.add_argument("--verify-graphs", default="both", choices=["on", "off", "both"],
                    help="CUDA: verify steps from captured graphs, eagerly, or both (the sweep runs each; batch1 and "
                    "cost use the first)")  # fmt: skip
    ap.add_argument("--fresh-speculator", action="store_true",
                    help="a new speculator for every run (costs measured from scratch each time: a cold worker); "
                    "default: one per draft and knobs for the whole run, as a long-running decode worker keeps it")
    ap.add_argument("--out", default=None, help="directory for speculative.json")
    args = ap.parse_args()
    global FRESH
    FRESH = args.fresh_speculator
    gpu = args.device.startswith("cuda")
    # GPU runs of 128 tokens took ~0.2 s, where one gen-2 collection or a scheduling hiccup is 5-10%.
    args.max_tokens = args.max_tokens or (8 if args.smoke else 256 if gpu else 64)
    args.rounds = args.rounds or (1 if args.smoke else 5 if gpu else 3)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.smoke else [1, 4, 16, 64])
    args.sweep_tokens = 6 if args.smoke else args.max_tokens if gpu else 16
    args.cost_steps = 3 if args.smoke else 30 if gpu else 10
    args.rpc_rounds = 3 if args.smoke else 100
    torch.set_num_threads(args.threads)

    base = EngineConfig(device=args.device, dtype=args.dtype, num_blocks=4096 if gpu else 2048, max_num_seqs=64,
                        spec_max_batch_size=16)
    # Built as a speculating engine so its runner captures verify graphs; each run then sets its own draft.
    built = dataclasses.replace(base, speculative="ngram", num_speculative_tokens=args.k,
                                spec_verify_graphs=args.verify_graphs != "off")  # fmt: skip
    engine = create_engine(None, built, local_draft=False)
    engine.warmup()
    freeze_heap()  # as a decode worker does after warm-up: collections skip the model
    graphs = engine.runner.graphs
    has_verify_graphs = graphs is not None and any(q > 1 for _, q in graphs.captured)
    args.modes = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.verify_graphs] if has_verify_graphs else ["off"]
    set_verify_graphs(engine, args.modes[0] == "on")
    tokenizer = load_tokenizer(default_model_path())
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        drafts = {"ngram": stack.enter_context(draft_server("ngram", args.device, 0, 1, args.dtype))}
        if not args.skip_model:
            drafts["model"] = stack.enter_context(draft_server("model", args.device, args.draft_layers, 1, args.dtype))
        parts = args.parts.split(",")
        results = {
            "batch1": batch1(engine, tokenizer, drafts, base, args) if "batch1" in parts else [],
            "cost_model": cost_model(engine, tokenizer, drafts["ngram"], base, args) if "cost" in parts else {},
            "batch_sweep": batch_sweep(engine, tokenizer, drafts["ngram"], base, args) if "sweep" in parts else [],
        }
    meta = {"device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": args.threads, "dtype": args.dtype, "k": args.k, "draft_layers": args.draft_layers, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "smoke": args.smoke, "verify_graph_modes": args.modes, "fresh_speculator": FRESH,
            "verify_graph_shapes": sorted(s for s in graphs.captured if s[1] > 1) if graphs is not None else [],
            "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(sys.argv)}  # fmt: skip
    print(f"# speculative decoding, {meta['device']}, {meta['date']}; median [min-max] over {args.rounds} rounds")
    print(f"{'task':<10} {'method':<12} {'tok/s':>7} {'[range]':>15} {'speedup':>7} {'[range]':>11} {'accept':>7} "
          f"{'acc.len':>8} {'draft ms':>9}")  # fmt: skip
    for r in results["batch1"]:
        print(f"{r['task']:<10} {r['method']:<12} {r['decode_tok_s']:>7} {span(r, 'tok_s_min', 'tok_s_max'):>15} "
              f"{r['speedup']:>7} {span(r, 'speedup_min', 'speedup_max'):>11} {r.get('acceptance_rate', '-'):>7} "
              f"{r.get('mean_accepted_length', '-'):>8} {r.get('draft_ms_per_call', '-'):>9}")  # fmt: skip
    cost = dict(results["cost_model"])
    round_trips = cost.pop("draft_round_trips", [])
    print("cost model:", json.dumps(cost))
    if round_trips:
        print("draft round trip per step, ms: mean, median [min-max]")
        print(f"{'seqs':>5} {'one ProposeBatch':>32} {'one Propose per sequence':>32}")
        for r in round_trips:
            print(f"{r['sequences']:>5} {rtt_text(r['batch_rpc_ms']):>32} {rtt_text(r['per_sequence_rpcs_ms']):>32}")
    print(f"{'batch':>5} {'graphs':>6} {'plain tok/s':>11} {'[range]':>15} {'attached-off':>12} {'[range]':>15} "
          f"{'x plain':>7} {'ngram tok/s':>11} {'[range]':>15} {'speedup':>7} {'[range]':>11} {'speculating':>11} "
          f"{'accept':>7} {'verifs':>7} {'replays':>8}")  # fmt: skip
    for r in results["batch_sweep"]:
        print(f"{r['batch']:>5} {r['verify_graphs']:>6} {r['plain_tok_s']:>11} {span(r, 'plain_min', 'plain_max'):>15} "
              f"{r['attached_off_tok_s']:>12} {span(r, 'attached_off_min', 'attached_off_max'):>15} "
              f"{r['attached_off_speedup']:>7} {r['ngram_tok_s']:>11} {span(r, 'ngram_min', 'ngram_max'):>15} "
              f"{r['speedup']:>7} {span(r, 'speedup_min', 'speedup_max'):>11} {str(r['speculating']):>11} "
              f"{r['acceptance_rate']:>7} {r['verifications']:>7} {r['verify_graph_replays']:>8}")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "speculative.json").write_text(json.dumps({"meta": meta, **results}, indent=2))


if __name__ == "__main__":
    main()
