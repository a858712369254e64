"""Runs one stage on this rank, under torchrun: the trainer's entry point, `python -m medmo_trainer --config <file or URI>`.

Exits with a code of `medmo_trainer.exit_codes` and leaves a one-line termination message in
`$MEDMO_TERMINATION_LOG` (default `/dev/termination-log`, what Kubernetes shows in the pod status).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from medmo_trainer.exit_codes import ConfigError, DataError, DistributedError, ExitCode, StageError
from medmo_trainer.fsio import export_storage_environment
from medmo_trainer.progress import success_message

TERMINATION_LOG_ENV = "MEDMO_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
_TERMINATION_MESSAGE_LIMIT = 4096  # bytes Kubernetes keeps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmo_trainer", description=__doc__.splitlines()[0].split(":")[0])
    parser.add_argument("--config", required=True, help="stage config file or fsspec URI (YAML or JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    is_pod_leader = os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        result = run_stage(args.config)
    except BaseException as error:  # every failure leaves an exit code and a message
        code = classify(error)
        traceback.print_exc()
        write_termination_message(f"{code.name} (exit {int(code)}): {error}")
        return int(code)
    if is_pod_leader:
        write_termination_message(success_message(result.steps, result.summary, result.output_uri))
    return int(ExitCode.OK)


def run_stage(config_source: str):
    """Loads the config, joins the process group and runs the registered stage."""
    from pydantic import ValidationError

    from medmo_trainer.config import load_stage_config

    try:
        config = load_stage_config(config_source)
    except ValidationError as error:
        raise ConfigError(f"invalid stage config {config_source}: {error}") from error
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read stage config {config_source}: {error}") from error
    export_storage_environment(config.storage)

    from medmo_trainer.dist import init_distributed, shutdown_distributed
    from medmo_trainer.stages import get_runner

    runner = get_runner(config.type)
    try:
        context = init_distributed()
    except Exception as error:
        raise DistributedError(f"joining the process group failed: {error}") from error
    try:
        return runner(config, context)
    finally:
        shutdown_distributed()


def classify(error: BaseException) -> ExitCode:
    """The exit code of a failure: its own for StageErrors, else by the error's type."""
    if isinstance(error, StageError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return ExitCode.UNEXPECTED
    if _is_dataset_error(error):
        return DataError.exit_code
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return ExitCode.DISTRIBUTED_FAILURE
    if isinstance(error, OSError):
        return ExitCode.STORAGE_UNAVAILABLE
    return ExitCode.UNEXPECTED


def _is_dataset_error(error: BaseException) -> bool:
    try:
        from medmo_trainer.data import DatasetUnavailableError
    except ImportError:
        return False
    return isinstance(error, DatasetUnavailableError)


def write_termination_message(message: str) -> None:
    """Writes one line for `kubectl describe pod`; a missing or read-only log is not an error."""
    path = os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    line = " ".join(message.split()).encode()[:_TERMINATION_MESSAGE_LIMIT].decode(errors="ignore")
    if path == DEFAULT_TERMINATION_LOG and not os.path.exists(path):
        # Outside Kubernetes (the kubelet creates this file) nothing is written into /dev.
        print(f"termination message: {line}", file=sys.stderr)
        return
    try:
        with open(path, "w") as handle:
            handle.write(line + "\n")
    except OSError:
        print(f"termination message (not written to {path}): {line}", file=sys.stderr)

