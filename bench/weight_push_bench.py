"""The broadcast weight channel against a plain broadcast of the same bytes: what pushing a
version costs over the floor of the link (the two-GPU issue's first figure, without vLLM).

Two processes: the sender (rank 0, the learner's end: BroadcastWeightSender) on the first
device and the receiver (rank 1, an actor group's end: BroadcastWeightReceiver writing into a
StagedWeights, as the vLLM worker receives) on the second; --backend nccl puts them on cuda:0
and cuda:1, --backend gloo on the CPU (a check of the bench itself, not a figure). Per model
shape (the parameter tensors of Qwen2-0.5B and -1.5B, vocabulary 151936, bf16, random; `tiny`
for the CPU check):
  floor_ms      one broadcast of all the weights' bytes as one tensor between the same two
                processes, in a group of their own: the median of --repeats after two warm-ups
  send_ms       BroadcastWeightSender.send of a new version, on the sender (the store
                handshake, packing the buckets, the broadcasts)
  committed_ms  "the learner has version v" (just before send) -> the receiver committed v into
                its staging copy (time.time() on one host); its median is transfer_ms
  swap_ms       the staging copy put in place of the served tensors, synchronized: what
                generation stands still for at a step boundary
  exact         after the last version the receiver's served tensors have the sender's
                checksums (per tensor: the sum and the sum of squares of its 16-bit words)

    python -m bench.weight_push_bench [--backend nccl] [--models 0.5b 1.5b] [--versions 10]
                                      [--repeats 10] [--bucket-mb 256] [--out FILE]

Prints a line per shape, then one JSON object: transfer_ms_<shape>, floor_ms_<shape>,
transfer_over_floor_<shape> (goal <= 2), send_ms_<shape>, swap_ms_<shape>, exact_<shape>,
backend, device, date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # Qwen2-0.5B and -1.5B (tied embeddings, q/k/v biases); tiny: a CPU check of the bench
    "0.5b": dict(vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2),
    "1.5b": dict(vocab=151936, hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2),
    "tiny": dict(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
}
TIMEOUT_S = 120.0


def shapes_of(model: str) -> dict:
    """Hugging Face parameter name -> shape, as a Qwen2 model of that size names them."""
    s = SHAPES[model]
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    out = {"model.embed_tokens.weight": (s["vocab"], h), "model.norm.weight": (h,)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (s["intermediate"], h),
                    p + "mlp.up_proj.weight": (s["intermediate"], h), p + "mlp.down_proj.weight": (h, s["intermediate"]),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return out


def checksums(tensors: dict) -> dict:
    """Per tensor, the sum and the sum of squares of its bf16 values read as 16-bit integers."""
    out = {}
    for name, t in tensors.items():
        words = t.reshape(-1).view(torch.int16).to(torch.int64)
        out[name] = [int(words.sum()), int((words * words).sum())]
    return out


def _device(backend: str, index: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _floor_store(port: int = 0):
    """The floor's own store: hosted (on a port the OS picks) by the sender's process, which
    makes it before it starts the receiver's, and joined by the receiver at `port`."""
    return torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=port == 0,
                                      timeout=datetime.timedelta(seconds=TIMEOUT_S), wait_for_workers=False)


def _floor_group(backend: str, store, rank: int):
    from common.weights_broadcast import BroadcastChannelSpec, _group
    # the same kind of group as the channel's, over the given store (nobody to meet: no rendezvous)
    return _group(BroadcastChannelSpec(None, 1, backend=backend, timeout_s=TIMEOUT_S), store, rank)


def receiver_main(backend: str, model: str, floor_port: int, spec, broadcasts: int, versions: int, out) -> None:
    """Rank 1: the floor's broadcasts, then every version into a StagedWeights, reported one by one."""
    try:
        from actors.engine import StagedWeights
        from common.weights_broadcast import _broadcast

        device = _device(backend, 1)
        nbytes = sum(2 * _numel(s) for s in shapes_of(model).values())
        store = _floor_store(floor_port)
        group = _floor_group(backend, store, 1)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        for _ in range(broadcasts):
            _broadcast(group, buffer, TIMEOUT_S)
        _sync(device)
        del buffer   # the group stays to the end: a NCCL group is taken down by its process's exit
        served = {n: torch.zeros(s, dtype=torch.bfloat16, device=device) for n, s in shapes_of(model).items()}
        staged = StagedWeights(served)
        receiver = spec.receiver(0)
        out.put(("floor done", None))
        for _ in range(versions):
            version = None
            deadline = time.monotonic() + TIMEOUT_S
            while version is None and time.monotonic() < deadline:
                version = receiver.receive(staged, timeout_s=0.5)
            if version is None:
                raise TimeoutError(f"no version arrived within {TIMEOUT_S}s")
            committed = time.time()
            t = time.perf_counter()
            staged.swap_if_ready()
            _sync(device)
            out.put(("version", (version, committed, (time.perf_counter() - t) * 1e3)))
        out.put(("checksums", checksums(served)))
        del store
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _take(out, kind: str, process):
    """The receiver's next report, which must be of `kind`; its failure or death raises, named."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            got, value = out.get(timeout=1.0)
        except Exception:
            if not process.is_alive():
                raise RuntimeError(f"the receiver process (pid {process.pid}) exited with code {process.exitcode}")
            continue
        if got == "error":
            raise RuntimeError(f"the receiver process failed: {value}")
        if got != kind:
            raise RuntimeError(f"the receiver reported {got!r}, expected {kind!r}")
        return value
    raise TimeoutError(f"the receiver process (pid {process.pid}) reported no {kind!r} within {TIMEOUT_S}s")


def bench_shape(model: str, args) -> dict:
    from common.rendezvous import RendezvousHost
    from common.weights_broadcast import BroadcastChannelSpec, _broadcast

    device = _device(args.backend, 0)
    shapes = shapes_of(model)
    nbytes = sum(2 * _numel(s) for s in shapes.values())
    meeting = RendezvousHost("127.0.0.1")   # where the receiver finds the channel's sender, as in a job
    spec = BroadcastChannelSpec(meeting.rendezvous("weights"), 1, backend=args.backend, timeout_s=TIMEOUT_S,
                                bucket_mb=args.bucket_mb)
    store = _floor_store()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    process = ctx.Process(target=receiver_main, args=(args.backend, model, store.port, spec, args.repeats + 2,
                                                      args.versions, out), daemon=True)
    process.start()
    try:
        group = _floor_group(args.backend, store, 0)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        floor = []
        for i in range(args.repeats + 2):
            _sync(device)
            t = time.perf_counter()
            _broadcast(group, buffer, TIMEOUT_S)
            _sync(device)
            if i >= 2:
                floor.append((time.perf_counter() - t) * 1e3)
        del buffer
        _take(out, "floor done", process)
        generator = torch.Generator(device=device).manual_seed(0)
        tensors = {n: torch.randn(s, generator=generator, device=device).to(torch.bfloat16) for n, s in shapes.items()}
        sender = spec.sender()
        rows = []
        for version in range(1, args.versions + 1):
            for t in tensors.values():   # a new version: every tensor changes
                t.add_(torch.randn(t.shape, generator=generator, device=device).to(t.dtype), alpha=2e-3)
            _sync(device)
            has = time.time()
            t = time.perf_counter()
            sender.send(version, tensors)
            send_ms = (time.perf_counter() - t) * 1e3
            got, committed, swap_ms = _take(out, "version", process)
            if got != version:
                raise RuntimeError(f"the receiver committed version {got}, the sender sent {version}")
            rows.append({"version": version, "send_ms": send_ms, "committed_ms": (committed - has) * 1e3,
                         "swap_ms": swap_ms})
            time.sleep(args.pause_s)
        exact = _take(out, "checksums", process) == checksums(tensors)
        del store
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    timed = rows[1:] if len(rows) > 1 else rows   # the first transfer also joins the group
    result = {"bytes": nbytes, "tensors": len(shapes), "floor_ms": statistics.median(floor),
              "transfer_ms": statistics.median(r["committed_ms"] for r in timed),
              "transfer_ms_max": max(r["committed_ms"] for r in timed),
              "send_ms": statistics.median(r["send_ms"] for r in timed),
              "swap_ms": statistics.median(r["swap_ms"] for r in timed), "first_ms": rows[0]["committed_ms"],
              "exact": exact, "rows": rows}
    result["transfer_over_floor"] = result["transfer_ms"] / result["floor_ms"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--models", nargs="+", default=["0.5b", "1.5b"], choices=list(SHAPES))
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--repeats", type=int, default=10, help="timed broadcasts of the floor")
    p.add_argument("--bucket-mb", type=float, default=256.0, help="the channel's bucket size (BroadcastChannelSpec.bucket_mb)")
    p.add_argument("--pause-s", type=float, default=0.2, help="between two versions")
    p.add_argument("--out", help="also write every row and the summary here (JSON)")
    args = p.parse_args()
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        p.error(f"--backend nccl needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    results = {}
    for model in args.models:
        r = results[model] = bench_shape(model, args)
        print(f"{model}: {r['bytes'] / 1e9:.2f} GB in {r['tensors']} tensors: transfer {r['transfer_ms']:.2f} ms "
              f"(max {r['transfer_ms_max']:.2f}; first {r['first_ms']:.1f}), floor {r['floor_ms']:.2f} ms, "
              f"x{r['transfer_over_floor']:.2f}; send {r['send_ms']:.2f} ms; swap {r['swap_ms']:.2f} ms; "
              f"exact {r['exact']}", flush=True)
    key = {m: m.replace(".", "p") for m in results}
    summary = {"backend": args.backend, "bucket_mb": args.bucket_mb,
               **{f"{name}_{key[m]}": r[name] for m, r in results.items()
                  for name in ("transfer_ms", "floor_ms", "transfer_over_floor", "send_ms", "swap_ms", "exact")},
               "device": (" + ".join(torch.cuda.get_device_name(i) for i in range(2)) if args.backend == "nccl"
                          else f"{platform.node()} CPU ({os.cpu_count()} cores)"),
               "date": datetime.date.today().isoformat(),
               "command": "python -m bench.weight_push_bench " + " ".join(sys.argv[1:])}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "summary": summary}, f, indent=1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
