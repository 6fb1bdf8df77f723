"""A PMI-1 process manager for MPICH-family MPIs, so that processes started by torchrun (or any
launcher that is not MPI's) form one MPI_COMM_WORLD with the launcher's ranks.

Rank 0 starts the server (`python -m torch_hpc.distributed.pmi`) in a child process; every rank
connects to it and hands the connected socket to MPI through PMI_FD / PMI_RANK / PMI_SIZE before
MPI_Init, exactly as MPICH's own mpiexec would. The server holds the key-value space and the
barriers of the wire protocol ("cmd=init", "get_maxes", "put", "get", "barrier_in", ...).
"""
import argparse
import os
import selectors
import socket
import subprocess
import sys
import uuid

MAXES = {"kvsname_max": 256, "keylen_max": 256, "vallen_max": 4096}


def _parse(line: str) -> dict:
    fields = {}
    for item in line.split():
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


class PmiServer:
    def __init__(self, size: int, local_size: int, listener: socket.socket):
        self.size = size
        self.listener = listener
        # Unique per job: MPICH derives shared-memory segment names from it.
        self.kvsname = f"torch_hpc_{uuid.uuid4().hex[:16]}"
        self.kvs = {"PMI_process_mapping": f"(vector,(0,{max(1, size // local_size)},{local_size}))"}
        self.barrier = []
        self.buffers = {}
        self.finished = 0
        self.sel = selectors.DefaultSelector()

    def reply(self, conn, **fields):
        conn.sendall((" ".join(f"{k}={v}" for k, v in fields.items()) + "\n").encode())

    def handle(self, conn, line: str) -> bool:
        """Answers one command; returns False once the client has finalized."""
        msg = _parse(line)
        cmd = msg.get("cmd")
        if cmd == "init":
            self.reply(conn, cmd="response_to_init", pmi_version=1, pmi_subversion=1, rc=0)
        elif cmd == "get_maxes":
            self.reply(conn, cmd="maxes", rc=0, **MAXES)
        elif cmd == "get_appnum":
            self.reply(conn, cmd="appnum", rc=0, appnum=0)
        elif cmd == "get_my_kvsname":
            self.reply(conn, cmd="my_kvsname", rc=0, kvsname=self.kvsname)
        elif cmd == "get_universe_size":
            self.reply(conn, cmd="universe_size", rc=0, size=self.size)
        elif cmd == "put":
            self.kvs[msg.get("key", "")] = msg.get("value", "")
            self.reply(conn, cmd="put_result", rc=0, msg="success")
        elif cmd == "get":
            key = msg.get("key", "")
            if key in self.kvs:
                self.reply(conn, cmd="get_result", rc=0, msg="success", value=self.kvs[key])
            else:
                self.reply(conn, cmd="get_result", rc=-1, msg="key_not_found", value="")
        elif cmd == "barrier_in":
            self.barrier.append(conn)
            if len(self.barrier) == self.size:
                for c in self.barrier:
                    self.reply(c, cmd="barrier_out", rc=0)
                self.barrier = []
        elif cmd == "finalize":
            self.reply(conn, cmd="finalize_ack", rc=0)
            return False
        elif cmd == "abort":
            print(f"torch_hpc pmi: a rank called MPI_Abort: {line}", file=sys.stderr, flush=True)
            os._exit(1)
        else:
            print(f"torch_hpc pmi: unsupported PMI command {line!r}", file=sys.stderr, flush=True)
            self.reply(conn, cmd=cmd or "unknown", rc=-1, msg="unsupported")
        return True

    def close(self, conn):
        self.sel.unregister(conn)
        conn.close()
        self.buffers.pop(conn, None)
        self.finished += 1

    def serve(self, connect_timeout: float):
        """Runs until every rank has finalized or closed its connection (ranks that die close
        theirs), or until no rank has connected within connect_timeout seconds."""
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        connected = 0
        while self.finished < self.size:
            events = self.sel.select(timeout=None if connected else connect_timeout)
            if not events and not connected:
                print("torch_hpc pmi: no rank connected; exiting", file=sys.stderr, flush=True)
                return
            for key, _ in events:
                if key.data == "accept":
                    conn, _ = self.listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.buffers[conn] = b""
                    self.sel.register(conn, selectors.EVENT_READ, "client")
                    connected += 1
                else:
                    conn = key.fileobj
                    data = conn.recv(65536)
                    if not data:
                        self.close(conn)
                        continue
                    self.buffers[conn] += data
                    while b"\n" in self.buffers.get(conn, b""):
                        line, _, rest = self.buffers[conn].partition(b"\n")
                        self.buffers[conn] = rest
                        if not self.handle(conn, line.decode()):
                            self.close(conn)
                            break


def start_server(size: int, local_size: int) -> tuple[subprocess.Popen, int]:
    """Starts the server in a child process; returns it and the port it listens on. It outlives
    rank 0's Python objects on purpose: MPI_Finalize, run after them, still needs its barrier."""
    proc = subprocess.Popen([sys.executable, "-m", "torch_hpc.distributed.pmi", "--size", str(size),
                             "--local-size", str(local_size)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("port="):
        raise RuntimeError(f"torch_hpc: the PMI server did not start (said {line!r})")
    return proc, int(line[5:])


def connect_client(hosts: list[str], port: int, rank: int, size: int) -> None:
    """Connects this rank to the server (at the first of `hosts` that answers) and sets what
    MPICH's MPI_Init reads."""
    from .addresses import connect_first
    sock = connect_first(hosts, port, timeout=20)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = sock.detach()
    for var in ("PMI_PORT", "PMI_ID", "PMI_HOSTNAME", "PMIX_RANK", "PMIX_NAMESPACE"):
        os.environ.pop(var, None)
    os.environ.update({"PMI_FD": str(fd), "PMI_RANK": str(rank), "PMI_SIZE": str(size)})


def _main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--local-size", type=int, required=True)
    args = p.parse_args()
    listener = socket.create_server(("", 0), backlog=max(128, args.size))
    print(f"port={listener.getsockname()[1]}", flush=True)
    PmiServer(args.size, args.local_size, listener).serve(connect_timeout=600)


if __name__ == "__main__":
    _main()
