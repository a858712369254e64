"""The `medmo` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from medmo_operator import api


def load_training_file(path: Path) -> api.MedMOTraining:
    """Reads and validates a MedMOTraining YAML file; raises SystemExit with the field errors."""
    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"{path}: cannot read the resource: {error}") from error
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: expected one MedMOTraining object, got {type(obj).__name__}")
    try:
        return api.parse_training(obj)
    except ValidationError as error:
        raise SystemExit(f"{path}: invalid MedMOTraining:\n{api.format_validation_error(error)}") from error


def _validate(args: argparse.Namespace) -> int:
    training = load_training_file(args.file)
    stages = ", ".join(f"{stage.name} ({stage.type})" for stage in training.spec.stages)
    print(f"{args.file}: valid MedMOTraining {training.metadata.name!r}: {stages}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from medmo_operator.local.run import resource_yaml, run_locally

    training = load_training_file(args.file)
    outcome = run_locally(training, args.workdir)
    status = outcome.status
    if status is not None:
        print(resource_yaml(training, status))
    if status is not None and status.phase == api.Phase.SUCCEEDED:
        _print_results(training, status, args.workdir)
        return 0
    if status is not None and status.phase == api.Phase.FAILED:
        failed = next((c for c in status.conditions if c.type == "Failed"), None)
        print(f"run {training.metadata.name} failed: {failed.message if failed else 'see the status above'}", file=sys.stderr)
        return 1
    # Stopped by a signal: the shell's convention, 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
    return 128 + int(outcome.interrupted_by)


def _print_results(training: api.MedMOTraining, status: api.MedMOTrainingStatus, workdir: Path) -> None:
    for record in status.stages:
        stage = next((s for s in training.spec.stages if s.name == record.name), None)
        if stage is not None and stage.type == "eval":
            print(f"eval metrics of stage {record.name}:")
            for key, value in sorted(record.metrics.items()):
                print(f"  {key:<48} {value:.4f}")
    try:
        from medmo_operator.report import write_report
    except ImportError:
        return
    from medmo_trainer.fsio import export_storage_environment

    # The report reads the run's storage as its pods did: an S3-compatible server needs the spec's endpoint.
    export_storage_environment(training.spec.storage)
    out_dir = workdir / training.metadata.name / "report"
    report = write_report(status.model_dump(mode="json", by_alias=True), training.spec.storage.uri, out_dir)
    print(f"report: {report}")


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from medmo_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmo", description="Train MedMO-style medical vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a MedMOTraining YAML file against the API")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=_validate)
    run = commands.add_parser("run", help="run a MedMOTraining on this machine, without a cluster")
    run.add_argument("file", type=Path)
    run.add_argument("--workdir", type=Path, default=Path(".medmo"), help="state, pod logs and the report (default: .medmo)")
    run.set_defaults(handler=_run)
    operator = commands.add_parser("operator", help="run the operator against the cluster of $KUBECONFIG (or in-cluster)")
    operator.add_argument("--namespace", action="append", help="watch only this namespace (repeatable); default: all")
    operator.add_argument("--liveness", default=None, help="serve kopf's liveness probe, e.g. http://0.0.0.0:8081/healthz")
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
