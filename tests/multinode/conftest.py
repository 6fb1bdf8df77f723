"""Two "nodes" on one machine: network namespaces, each with its own loopback and one veth end
(named thpc0 in both) on a private /24 of their own, so MPI, torchrun and gloo must use the
network between them. Needs root and `ip`; skips with the reason otherwise. The namespaces are
removed afterwards, even when a test fails."""
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (launchers.py)

RSH = """#!/bin/sh
# ssh stand-in for MPI launchers: runs the command in the namespace that owns the host address.
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
%s
  *) echo "no node has address $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
"""


@dataclass
class Nodes:
    names: list      # namespace per node
    addresses: list  # its address on the link between them
    rsh: str         # the ssh stand-in

    def run(self, node: int, cmd, timeout=90, env=None):
        """cmd in node's namespace; a launch still running after `timeout` (each test's takes
        under 12 s) is killed with everything it started and the test fails with its output."""
        return self.finish(self.popen(node, cmd, env), timeout, cmd)

    def popen(self, node: int, cmd, env=None):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="thpc0",
                        **(env or {}))
        # a session of its own: a timeout kills the launcher's whole process group (killing `ip`
        # alone left the ranks holding the output pipes, and the wait went on)
        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *map(str, cmd)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                start_new_session=True)

    @staticmethod
    def finish(proc, timeout, cmd):
        """Waits for a launch of Nodes.popen: a CompletedProcess, or the test fails after
        `timeout` with the command and what it printed, its process group killed."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n--- stdout\n{out[-3000:]}"
                        f"\n--- stderr\n{err[-5000:]}", pytrace=False)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def nodes(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("multi-node tests need root and iproute2 (`ip netns`)")
    tag = f"{os.getpid() % 100000}"
    names = [f"thpc{tag}n0", f"thpc{tag}n1"]
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() // 100 % 250}"
    addresses = [f"{subnet}.1", f"{subnet}.2"]
    made = []
    try:
        for ns in names:
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh("ip", "link", "add", f"thpc{tag}a", "type", "veth", "peer", "name", f"thpc{tag}b")
        for ns, end, address in zip(names, (f"thpc{tag}a", f"thpc{tag}b"), addresses):
            _sh("ip", "link", "set", end, "netns", ns)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", end, "name", "thpc0")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", "thpc0")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "thpc0", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {getattr(e, 'stderr', e)}")
    rsh = tmp_path_factory.mktemp("nodes") / "netns-rsh"
    rsh.write_text(RSH % "\n".join(f"  {a}) ns={n} ;;" for a, n in zip(addresses, names)))
    rsh.chmod(0o755)
    try:
        yield Nodes(names, addresses, str(rsh))
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
