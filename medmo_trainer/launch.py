"""`python -m medmo_trainer.launch <torchrun arguments>`: torchrun that keeps the workers' exit code.

Plain torchrun exits 1 whenever a worker fails, which would hide the failure class the operator's
podFailurePolicy needs (`medmo_trainer.exit_codes`). This runs torchrun's own launcher and exits
with the code of the first failed worker (128 + N for a worker killed by signal N).
"""

from __future__ import annotations

import sys

from medmo_trainer.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except RendezvousError as error:
        print(f"rendezvous failed: {error}", file=sys.stderr)
        return int(ExitCode.DISTRIBUTED_FAILURE)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
