"""Run under mpiexec or torchrun: every hpc_mpi operation x dtype x reduce op, sub-groups, async
ops, error paths and DDP against gloo. Each rank computes the expected values of all ranks
itself and prints one 'RESULT {json}' line per named case (e.g. "reduce_scatter-float32") with
the number of checks and the failures it saw. tests/test_hpc_mpi.py lists the cases (CASES) and
turns each into a pytest test of its own.

    python collectives_worker.py [cpu|cuda]
"""
import contextlib
import datetime
import json
import sys
import threading
import time
import traceback
import warnings

import torch
import torch.distributed as dist

import torch_hpc

DEVICE_KIND = sys.argv[1] if len(sys.argv) > 1 else "cpu"
launch = torch_hpc.distributed.init("hpc_mpi")
RANK, N = dist.get_rank(), dist.get_world_size()
if DEVICE_KIND == "cuda":
    DEVICE = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(DEVICE)
else:
    DEVICE = torch.device("cpu")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
DTYPES = FLOATS + INTS + [torch.bool]
P2P_DTYPES = [torch.float32, torch.float16, torch.int64, torch.bool]
R = dist.ReduceOp
results = {}        # case -> {"checks": n, "failures": [...]}
current = ["setup"]
warnings.filterwarnings("ignore")


def short(dtype):
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def case(name):
    """Checks inside belong to case `name`; an exception is recorded as its failure."""
    current.append(name)
    results.setdefault(name, {"checks": 0, "failures": []})
    try:
        yield
    except Exception:
        fail(traceback.format_exc(limit=3))
    finally:
        current.pop()


def fail(message):
    results.setdefault(current[-1], {"checks": 0, "failures": []})["failures"].append(message)


def count():
    results.setdefault(current[-1], {"checks": 0, "failures": []})["checks"] += 1


def value(rank, numel=7, dtype=torch.float32, offset=0):
    """Rank `rank`'s input: small values so that products fit every dtype exactly."""
    base = (torch.arange(numel) + offset) % 3
    if dtype == torch.bool:
        return ((base + rank) % 2 == 0)
    return (base + rank + 1).to(dtype)


def ops_for(dtype):
    if dtype == torch.bool:
        return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]
    if dtype.is_floating_point:
        return [R.SUM, R.AVG, R.PRODUCT, R.MIN, R.MAX]
    return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]


def reduce_ref(tensors, op):
    dtype = tensors[0].dtype
    if dtype == torch.bool:
        stack = torch.stack(tensors)
        if op in (R.SUM, R.MAX, R.BOR):
            return stack.any(0)
        if op in (R.PRODUCT, R.MIN, R.BAND):
            return stack.all(0)
        return stack.sum(0) % 2 == 1  # BXOR
    stack = torch.stack([t.double() if dtype.is_floating_point else t.long() for t in tensors])
    if op == R.SUM:
        out = stack.sum(0)
    elif op == R.AVG:
        out = stack.mean(0)
    elif op == R.PRODUCT:
        out = stack.prod(0)
    elif op == R.MIN:
        out = stack.min(0).values
    elif op == R.MAX:
        out = stack.max(0).values
    else:
        out = stack[0].clone()
        for t in stack[1:]:
            out = {R.BAND: out & t, R.BOR: out | t, R.BXOR: out ^ t}[op]
    return out.to(dtype)


def check(name, got, expected):
    count()
    try:
        torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=1e-2 if got.dtype in (
            torch.float16, torch.bfloat16) else 1e-6, atol=1e-6, equal_nan=False)
    except AssertionError as e:
        fail(f"{name}: {str(e).splitlines()[0]} got {got.tolist()} expected {expected.tolist()}")


def expect_error(name, fn, exc=(ValueError, TypeError, RuntimeError)):
    count()
    try:
        fn()
    except exc:
        return
    except Exception as e:  # wrong kind of error
        fail(f"{name}: raised {type(e).__name__}: {e}")
        return
    fail(f"{name}: no error raised")


def on(t):
    return t.to(DEVICE)


def test_all_reduce():
    for dtype in DTYPES:
        with case(f"all_reduce-{short(dtype)}"):
            for op in ops_for(dtype):
                t = on(value(RANK, dtype=dtype))
                dist.all_reduce(t, op=op)
                check(f"all_reduce {dtype} {op}", t, reduce_ref([value(r, dtype=dtype) for r in range(N)], op))
    with case("all_reduce_noncontiguous"):  # reduced in place through its view
        t = on(torch.stack([value(RANK), value(RANK)], 1))[:, 1]
        dist.all_reduce(t)
        check("all_reduce non-contiguous", t, reduce_ref([value(r) for r in range(N)], R.SUM))
    with case("all_reduce_1M"):
        big = on(torch.full((1 << 20,), float(RANK + 1)))
        dist.all_reduce(big)
        check("all_reduce 1M floats", big[:: 1 << 16], torch.full((16,), float(N * (N + 1) / 2)))


def test_movement():
    root = N - 1
    for dtype in DTYPES:
        with case(f"broadcast-{short(dtype)}"):
            t = on(value(RANK, dtype=dtype))
            dist.broadcast(t, src=root)
            check(f"broadcast {dtype}", t, value(root, dtype=dtype))

        with case(f"all_gather-{short(dtype)}"):
            outs = [on(torch.zeros(7, dtype=dtype)) for _ in range(N)]
            dist.all_gather(outs, on(value(RANK, dtype=dtype)))
            for r in range(N):
                check(f"all_gather {dtype} [{r}]", outs[r], value(r, dtype=dtype))

        with case(f"all_gather_into_tensor-{short(dtype)}"):
            flat = on(torch.zeros(N * 7, dtype=dtype))
            dist.all_gather_into_tensor(flat, on(value(RANK, dtype=dtype)))
            check(f"all_gather_into_tensor {dtype}", flat, torch.cat([value(r, dtype=dtype) for r in range(N)]))

        with case(f"gather-{short(dtype)}"):
            gathered = [on(torch.zeros(7, dtype=dtype)) for _ in range(N)] if RANK == 0 else None
            dist.gather(on(value(RANK, dtype=dtype)), gathered, dst=0)
            if RANK == 0:
                for r in range(N):
                    check(f"gather {dtype} [{r}]", gathered[r], value(r, dtype=dtype))

        with case(f"scatter-{short(dtype)}"):
            out = on(torch.zeros(7, dtype=dtype))
            pieces = [on(value(r, dtype=dtype, offset=5)) for r in range(N)] if RANK == 0 else None
            dist.scatter(out, pieces, src=0)
            check(f"scatter {dtype}", out, value(RANK, dtype=dtype, offset=5))

        with case(f"all_to_all_single-{short(dtype)}"):
            # equal splits: rank r sends chunk p (2 values) to rank p
            send = on(torch.cat([value(RANK * N + p, numel=2, dtype=dtype) for p in range(N)]))
            recv = on(torch.zeros(2 * N, dtype=dtype))
            dist.all_to_all_single(recv, send)
            check(f"all_to_all_single {dtype}", recv,
                  torch.cat([value(p * N + RANK, numel=2, dtype=dtype) for p in range(N)]))

    with case("all_gather_into_tensor_in_place"):  # the input is this rank's slot (as FSDP2 does)
        flat = on(torch.zeros(N * 7))
        flat[RANK * 7:(RANK + 1) * 7] = on(value(RANK))
        dist.all_gather_into_tensor(flat, flat[RANK * 7:(RANK + 1) * 7])
        check("all_gather_into_tensor in place", flat, torch.cat([value(r) for r in range(N)]))

    with case("all_to_all_single_uneven"):  # rank r sends (p + 1) rows of width 3 to rank p
        send = on(torch.cat([torch.full((p + 1, 3), float(10 * RANK + p)) for p in range(N)]))
        recv = on(torch.zeros(N * (RANK + 1), 3))
        dist.all_to_all_single(recv, send, output_split_sizes=[RANK + 1] * N,
                               input_split_sizes=[p + 1 for p in range(N)])
        check("all_to_all_single uneven", recv,
              torch.cat([torch.full((RANK + 1, 3), float(10 * p + RANK)) for p in range(N)]))

    with case("all_gather_coalesced"):  # one output list per rank, shaped like the inputs
        ins = [on(value(RANK, numel=3)), on(value(RANK, numel=5, offset=1))]
        outs = [[on(torch.zeros(3)), on(torch.zeros(5))] for _ in range(N)]
        dist.all_gather_coalesced(outs, ins)
        for r in range(N):
            check(f"all_gather_coalesced [{r}][0]", outs[r][0], value(r, numel=3))
            check(f"all_gather_coalesced [{r}][1]", outs[r][1], value(r, numel=5, offset=1))

    with case("all_to_all"):
        outs = [on(torch.zeros(p + 2)) for p in range(N)]
        dist.all_to_all(outs, [on(torch.full((RANK + 2,), float(RANK * 100 + p))) for p in range(N)])
        for p in range(N):
            check(f"all_to_all [{p}]", outs[p], torch.full((p + 2,), float(p * 100 + RANK)))


def test_reduce_family():
    for dtype in DTYPES:
        with case(f"reduce-{short(dtype)}"):
            op = R.SUM if dtype != torch.bool else R.BOR
            t = on(value(RANK, dtype=dtype))
            dist.reduce(t, dst=0, op=op)
            if RANK == 0:
                check(f"reduce {dtype}", t, reduce_ref([value(r, dtype=dtype) for r in range(N)], op))
        for op in (R.SUM, R.MAX):
            ins = [on(value(RANK, numel=3, dtype=dtype, offset=p)) for p in range(N)]
            expected = reduce_ref([value(r, numel=3, dtype=dtype, offset=RANK) for r in range(N)], op)
            with case(f"reduce_scatter-{short(dtype)}"):
                out = on(torch.zeros(3, dtype=dtype))
                dist.reduce_scatter(out, ins, op=op)
                check(f"reduce_scatter {dtype} {op}", out, expected)
            with case(f"reduce_scatter_tensor-{short(dtype)}"):
                out = on(torch.zeros(3, dtype=dtype))
                dist.reduce_scatter_tensor(out, torch.cat(ins), op=op)
                check(f"reduce_scatter_tensor {dtype} {op}", out, expected)
    with case("all_reduce_coalesced"):
        a, b = on(value(RANK, numel=4)), on(value(RANK, numel=9, dtype=torch.float32, offset=1))
        dist.all_reduce_coalesced([a, b])
        check("all_reduce_coalesced [0]", a, reduce_ref([value(r, numel=4) for r in range(N)], R.SUM))
        check("all_reduce_coalesced [1]", b, reduce_ref([value(r, numel=9, offset=1) for r in range(N)], R.SUM))


def test_point_to_point_and_async():
    nxt, prev = (RANK + 1) % N, (RANK - 1) % N
    for dtype in P2P_DTYPES:
        with case(f"send_recv-{short(dtype)}"):
            got = on(torch.zeros(7, dtype=dtype))
            if RANK % 2 == 0:  # blocking send/recv ordered so that it cannot deadlock either way
                dist.send(on(value(RANK, dtype=dtype)), nxt)
                dist.recv(got, prev)
            else:
                dist.recv(got, prev)
                dist.send(on(value(RANK, dtype=dtype)), nxt)
            check(f"send/recv {dtype}", got, value(prev, dtype=dtype))
    with case("isend_irecv"):
        got = on(torch.zeros(5))
        reqs = [dist.irecv(got, prev), dist.isend(on(value(RANK, numel=5)), nxt)]  # recv first
        for q in reqs:
            q.wait()
        check("irecv before isend", got, value(prev, numel=5))
    with case("batch_isend_irecv"):
        got = on(torch.zeros(5))
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, on(value(RANK, numel=5)), nxt),
                                       dist.P2POp(dist.irecv, got, prev)])
        for q in reqs:
            q.wait()
        check("batch_isend_irecv", got, value(prev, numel=5))

    with case("async_all_reduce"):
        t = on(value(RANK))
        work = dist.all_reduce(t, async_op=True)
        fut = work.get_future()
        work.wait()
        check("async all_reduce", t, reduce_ref([value(r) for r in range(N)], R.SUM))
        check("async future value", fut.wait()[0], t)
        works = [dist.all_reduce(on(torch.ones(3) * i), async_op=True) for i in range(20)]
        for w in works:
            w.wait()
    with case("async_queue"):
        # Blocking collectives behind queued async ones (CPU: these may run on the caller's
        # thread only once the queue is empty), and async work whose handle is dropped at once.
        big = [on(value(RANK, numel=1 << 16, offset=i)) for i in range(3)]
        works = [dist.all_reduce(b, async_op=True) for b in big]
        dropped = on(value(RANK, numel=9))
        dist.all_reduce(dropped, async_op=True)
        small = on(value(RANK, numel=5))
        dist.all_reduce(small)
        dist.broadcast(small, src=N - 1)
        check("blocking after async", small, on(reduce_ref([value(r, numel=5) for r in range(N)], R.SUM)))
        if DEVICE.type == "cpu":  # one queue: the dropped op finished before the blocking ones
            check("dropped async handle", dropped, reduce_ref([value(r, numel=9) for r in range(N)], R.SUM))
        for i, (w, b) in enumerate(zip(works, big)):
            w.wait()
            check(f"queued async all_reduce {i}", b,
                  on(reduce_ref([value(r, numel=1 << 16, offset=i) for r in range(N)], R.SUM)))
    with case("recv_any_source"):
        if RANK == 0:
            received = on(torch.zeros(1))
            senders = []
            for _ in range(N - 1):
                w = dist.irecv(received)  # any source
                w.wait()
                senders.append(w._source_rank())
            check("recv any source", torch.tensor(sorted(senders)), torch.arange(1, N))
        else:
            dist.send(on(torch.ones(1) * RANK), 0)
        dist.barrier()


def test_blocking_collective_releases_gil():
    """Rank 0 waits in a blocking all_reduce while the last rank sleeps; a Python thread on
    rank 0 must keep running meanwhile."""
    ticks, stop = [0], threading.Event()

    def tick():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)
    thread = threading.Thread(target=tick)
    thread.start()
    if RANK == N - 1:
        time.sleep(0.3)
    before = ticks[0]
    t = on(torch.ones(4))
    dist.all_reduce(t)
    during = ticks[0] - before
    stop.set()
    thread.join()
    check("all_reduce after a late rank", t, on(torch.full((4,), float(N))))
    if RANK == 0 and during < 20:
        fail(f"GIL held during a blocking all_reduce: the other thread ran {during} times in ~0.3 s")


def test_sub_groups():
    evens = list(range(0, N, 2))
    odd_first = list(range(N - 1, -1, -1))  # all ranks, given in reverse order
    g_even = dist.new_group(evens)
    g_rev = dist.new_group(odd_first)
    if RANK in evens:
        t = on(torch.ones(4) * RANK)
        dist.all_reduce(t, group=g_even)
        check("sub-group all_reduce", t, torch.ones(4) * sum(evens))
        outs = [on(torch.zeros(1)) for _ in evens]
        dist.all_gather(outs, on(torch.ones(1) * RANK), group=g_even)
        check("sub-group all_gather", torch.cat(outs), torch.tensor([float(r) for r in evens]))
    t = on(torch.ones(2) * RANK)
    dist.broadcast(t, src=N - 1, group=g_rev)
    check("reversed group broadcast", t, torch.ones(2) * (N - 1))
    if N >= 3:
        pair = dist.new_group([1, 2])
        if RANK in (1, 2):
            t = on(torch.ones(1) * RANK)
            dist.all_reduce(t, group=pair)
            check("pair group", t, torch.ones(1) * 3)
    dist.barrier()


def test_options():
    """pg_options reach the backend: a group whose all_reduce runs in 64-byte pieces through the
    worker thread gives the same sums; pg_options of another type are refused."""
    opts = torch_hpc.distributed.Options(inline_blocking=False, spin_us=0, allreduce_chunk_bytes=64)
    group = dist.new_group(list(range(N)), pg_options=opts)
    t = on(torch.arange(1000, dtype=torch.float32) + RANK)
    dist.all_reduce(t, group=group)
    check("all_reduce in 64-byte pieces", t, N * torch.arange(1000, dtype=torch.float32) + N * (N - 1) / 2)
    expect_error("pg_options of another type", lambda: dist.new_group(list(range(N)), pg_options=object()),
                 exc=TypeError)


def test_monitored_barrier():
    """All ranks pass; then the last rank stays away: rank 0 names it, the others are not released."""
    monitored_barrier = torch_hpc.distributed.monitored_barrier
    monitored_barrier(timeout=datetime.timedelta(seconds=30))
    count()
    if RANK != N - 1:
        count()
        expected = f"Rank {N - 1} failed to pass" if RANK == 0 else "was not released"
        try:
            monitored_barrier(timeout=datetime.timedelta(seconds=1), wait_all_ranks=True)
            fail("monitored_barrier without the last rank: no error raised")
        except RuntimeError as e:
            if expected not in str(e):
                fail(f"monitored_barrier without the last rank: the error does not say {expected!r}: {e}")
    dist.barrier()


def test_sparse_all_reduce():
    if DEVICE.type != "cpu":
        return expect_error("sparse CUDA all_reduce", lambda: dist.all_reduce(
            torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1), (3,)).to(DEVICE)))
    def sparse(r):
        return torch.sparse_coo_tensor(torch.tensor([[r % 3, 2], [0, r]]), torch.tensor([1.0 + r, 10.0]), (3, N))
    t = sparse(RANK)
    dist.all_reduce(t)
    check("sparse all_reduce", t.to_dense(), sum(sparse(r).to_dense() for r in range(N)))
    expect_error("sparse all_reduce MAX", lambda: dist.all_reduce(sparse(RANK), op=R.MAX))


def test_errors():
    expect_error("unsupported dtype uint32", lambda: dist.all_reduce(on(torch.ones(2, dtype=torch.uint32))))
    expect_error("AVG on int", lambda: dist.all_reduce(on(torch.ones(2, dtype=torch.int32)), op=R.AVG))
    expect_error("PREMUL_SUM", lambda: dist.all_reduce(
        on(torch.ones(2)), op=dist._make_nccl_premul_sum(2.0)))
    expect_error("all_gather_into_tensor size", lambda: dist.all_gather_into_tensor(
        on(torch.zeros(N * 7 + 1)), on(torch.zeros(7))))
    expect_error("reduce_scatter_tensor size", lambda: dist.reduce_scatter_tensor(
        on(torch.zeros(2)), on(torch.zeros(2 * N + 1))))
    expect_error("all_to_all_single splits", lambda: dist.all_to_all_single(
        on(torch.zeros(N)), on(torch.zeros(N)), input_split_sizes=[N + 1] + [0] * (N - 1)))
    t = on(torch.ones(3))
    dist.all_reduce(t)  # the group still works after the errors
    check("all_reduce after errors", t, torch.ones(3) * N)


def test_ddp_matches_gloo():
    gloo = dist.new_group(backend="gloo")

    def train(group, device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group, bucket_cap_mb=0.001)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + RANK)
        for _ in range(5):
            x, y = torch.randn(8, 16, generator=gen).to(device), torch.randn(8, 4, generator=gen).to(device)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])

    ours = train(None, DEVICE)
    ref = train(gloo, torch.device("cpu"))
    count()
    diff = (ours - ref).abs().max().item()
    tolerance = 1e-6 if N <= 2 else 1e-5
    if not diff <= tolerance:
        fail(f"DDP hpc_mpi vs gloo: max |diff| {diff:.3g} > {tolerance}")


test_all_reduce()
test_movement()
test_reduce_family()
test_point_to_point_and_async()
for name, fn in [("sub_groups", test_sub_groups), ("options", test_options),
                 ("sparse_all_reduce", test_sparse_all_reduce), ("errors", test_errors),
                 ("gil_release", test_blocking_collective_releases_gil),
                 ("ddp_vs_gloo", test_ddp_matches_gloo), ("monitored_barrier", test_monitored_barrier)]:
    with case(name):
        fn()
dist.barrier()
dist.destroy_process_group()
# One short line per case: a launcher may interleave ranks' output at 4 KiB boundaries, and a
# single write below that size arrives whole.
for name, result in results.items():
    print("RESULT " + json.dumps({"rank": RANK, "size": N, "device": str(DEVICE), "case": name,
                                  "checks": result["checks"],
                                  "failures": [f[:500] for f in result["failures"][:4]]}), flush=True)
