"""This host's IPv4 addresses, and picking one that other ranks can reach. Across hosts (or
network namespaces) the host name may resolve to a loopback address on every one of them, so a
rendezvous address is chosen by trying: the serving rank lists its addresses and the others
connect to the first that answers."""
import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915


def local_ipv4_addresses() -> list[str]:
    """The IPv4 addresses of this host's interfaces, loopback last."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(packed[20:24])
            if address not in found:
                found.append(address)
    return sorted(found, key=lambda a: a.startswith("127."))


def connect_first(addresses, port: int, timeout: float) -> socket.socket:
    """A socket connected to the first of `addresses` that accepts on `port`."""
    errors = []
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError as e:
            errors.append(f"{address}: {e}")
    raise ConnectionError(f"torch_hpc: none of {list(addresses)} accepted a connection on port "
                          f"{port} ({'; '.join(errors)})")


def reachable_by_all(comm) -> str:
    """Under MPI: an address of rank 0 that every rank of `comm` can connect to (collective)."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_host = node.size == comm.size
    node.Free()
    if one_host:
        return "127.0.0.1"
    listener = None
    if comm.rank == 0:
        addresses = local_ipv4_addresses()
        listener = socket.create_server(("", 0), backlog=comm.size * (len(addresses) + 1))
        offer = (addresses, listener.getsockname()[1])
    else:
        offer = None
    candidates, port = comm.bcast(offer, root=0)
    reached = 0
    if comm.rank != 0:
        for i, address in enumerate(candidates):
            try:
                socket.create_connection((address, port), timeout=2.0).close()
                reached |= 1 << i
            except OSError:
                pass
    else:
        reached = (1 << len(candidates)) - 1
    common = comm.allreduce(reached, op=MPI.BAND)
    if listener is not None:
        listener.close()
    usable = [a for i, a in enumerate(candidates) if common >> i & 1]
    if not usable:
        raise ConnectionError(f"torch_hpc: no address of rank 0 ({candidates}) is reachable from "
                              "every rank; set MASTER_ADDR")
    return usable[0]
