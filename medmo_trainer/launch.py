"""`python -m medmo_trainer.launch <torchrun arguments>`: torchrun that keeps the workers' exit code.

Plain torchrun exits 1 whenever a worker fails, which would hide the failure class the operator's
podFailurePolicy needs (`medmo_trainer.exit_codes`). This runs torchrun's own launcher and exits
with the code of the first failed worker (128 + N for a worker killed by signal N).

A rendezvous that cannot complete (rank 0's name does not resolve, its port cannot be reached, or
not every node joins) ends after torchrun's rendezvous timeout (`--rdzv-conf timeout=S`, which the
operator sets in the pod) with a message naming the rendezvous host, also written as the
container's termination message, so it reaches the run's status instead of a silent wait.
"""

from __future__ import annotations

import socket
import sys

from medmo_trainer.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except (RendezvousError, DistError) as error:
        # Worker failures arrive as ChildFailedError: these come from the agent's own rendezvous.
        from medmo_trainer.entrypoint import write_termination_message

        message = rendezvous_failure(args, error)
        print(message, file=sys.stderr)
        code = ExitCode.DISTRIBUTED_FAILURE
        write_termination_message(f"{code.name} (exit {int(code)}): {message}")
        return int(code)
    return int(ExitCode.OK)


def rendezvous_failure(args, error: BaseException) -> str:
    """What went wrong, naming the rendezvous host: unresolvable, unreachable, or peers missing."""
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import _default_timeout_seconds
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config, parse_rendezvous_endpoint
    from torch.distributed.run import get_rdzv_endpoint

    host, port = parse_rendezvous_endpoint(get_rdzv_endpoint(args), default_port=-1)
    config = _parse_rendezvous_config(args.rdzv_conf)
    timeout = config.get("timeout", config.get("join_timeout", _default_timeout_seconds))
    bound = f"rendezvous timeout {timeout} s, set by --rdzv-conf timeout=S or PET_RDZV_CONF"
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as unresolved:
        return (f"rendezvous failed: cannot resolve the rendezvous host {host} (rank 0, port {port}); "
                f"retried until the {bound}: {unresolved.strerror}")
    return f"rendezvous of {args.nnodes} node(s) at {host}:{port} failed ({bound}): {detail}"

if __name__ == "__main__":
    sys.exit(main())
