"""The `medmo` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml
from pydantic import ValidationError

from medmo_operator import api
from medmo_trainer.config import ALL_TASKS


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


def _data_convert(args: argparse.Namespace) -> int:
    from medmo_trainer.data.convert import convert_file

    try:
        result = convert_file(args.layout, args.source, args.output, images=args.images)
    except (OSError, ValueError) as error:
        raise SystemExit(f"medmo data convert: {error}") from error
    for problem in result.problems:
        print(f"{args.source}: {problem} (left out)", file=sys.stderr)
    tasks = ", ".join(f"{task} {n}" for task, n in sorted(Counter(r.task for r in result.records).items()))
    print(f"{args.output}: {len(result.records)} records ({tasks or 'none'}); {len(result.problems)} rows left out")
    return 0 if result.records else 1


def _data_check(args: argparse.Namespace) -> int:
    from medmo_trainer.data.check import check_dataset, format_check
    from medmo_trainer.data.records import DatasetUnavailableError

    try:
        result = check_dataset(args.uri, images=not args.no_images)
    except DatasetUnavailableError as error:
        raise SystemExit(f"medmo data check: {error}") from error
    print(format_check(args.uri, result, shown=args.show))
    return 0 if not result.skipped and result.usable else 1


def _data_index(args: argparse.Namespace) -> int:
    from medmo_trainer.data.pack import index, parse_columns
    from medmo_trainer.data.records import DatasetUnavailableError

    try:
        print(json.dumps(index(args.uri, parse_columns(args.column))))
    except (DatasetUnavailableError, ValueError) as error:
        raise SystemExit(f"medmo data index: {error}") from error
    return 0


def _data_pack(args: argparse.Namespace) -> int:
    from medmo_trainer.data.pack import pack, parse_columns
    from medmo_trainer.data.records import DatasetUnavailableError

    if args.records_per_shard < 1:
        raise SystemExit("medmo data pack: --records-per-shard must be at least 1")
    try:
        print(json.dumps(pack(args.source, args.dest, args.records_per_shard, parse_columns(args.column), args.task)))
    except (DatasetUnavailableError, ValueError) as error:
        raise SystemExit(f"medmo data pack: {error}") from error
    return 0


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from medmo_operator import handlers  # (importing it registers the handlers)
    from medmo_operator.peering import Peering

    kopf.configure(verbose=args.verbose)
    peering: dict = {}
    if args.peering:
        handlers.SETTINGS.peering = Peering.start(args.peering, args.peering_lifetime)
        settings = kopf.OperatorSettings()
        settings.peering.lifetime = args.peering_lifetime
        peering = dict(peering_name=args.peering, identity=handlers.SETTINGS.peering.identity,
                       priority=handlers.SETTINGS.peering.priority, settings=settings)
    kopf.run(
        standalone=not args.peering,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
        **peering,
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
    data = commands.add_parser("data", help="bring your own data: convert public layouts to MedMO records, check a dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    convert = data_commands.add_parser(
        "convert", help="convert a public dataset layout into MedMO JSONL records",
        description="Layouts: vqa-json (VQA-RAD/SLAKE question-answer JSON), mcq-csv (PMC-VQA-style "
                    "multiple-choice CSV), report-csv (MIMIC-CXR-style report CSV), coco (COCO detection JSON "
                    "to grounding records). Rows that cannot be converted are listed with their line number "
                    "and left out.")
    convert.add_argument("layout", help="vqa-json, mcq-csv, report-csv or coco")
    convert.add_argument("source", help="the file to convert (path or fsspec URI)")
    convert.add_argument("output", help="the JSONL file to write (path or fsspec URI)")
    convert.add_argument("--images", default=None,
                         help="folder the source's image paths are relative to (default: the source's folder)")
    convert.set_defaults(handler=_data_convert)
    check = data_commands.add_parser(
        "check", help="validate a dataset: records per task, and the lines a stage would skip and why",
        description="Exits 0 when every record is usable, 1 when some line would be skipped (or none is usable).")
    check.add_argument("uri", help="a .jsonl/.parquet/.arrow file or a folder of them (path or fsspec URI)")
    check.add_argument("--no-images", action="store_true", help="do not open the records' images")
    check.add_argument("--show", type=int, default=20, help="skipped lines to list (default: 20)")
    check.set_defaults(handler=_data_check)
    column_help = "the tabular (Parquet, Arrow) column holding a record field, e.g. prompt=question (repeatable)"
    index = data_commands.add_parser(
        "index", help="write medmo-index.json: every shard's records per task, so loaders start without reading shards",
        description="Counts the records of every shard of a folder once. Write it again after changing the shards.")
    index.add_argument("uri", help="a folder of .jsonl/.parquet/.arrow shards (path or fsspec URI)")
    index.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN", help=column_help)
    index.set_defaults(handler=_data_index)
    pack = data_commands.add_parser(
        "pack", help="convert a dataset to Parquet shards with their index, for streaming",
        description="Keeps the records that validate (the others are counted by reason and left out), makes "
                    "image references absolute (images stay where they are) and writes Parquet shards under DEST.")
    pack.add_argument("source", help="a .jsonl/.parquet/.arrow file or a folder of them (path or fsspec URI)")
    pack.add_argument("dest", help="the folder to write (path or fsspec URI)")
    pack.add_argument("--records-per-shard", type=int, default=10_000, help="records per Parquet shard (default: 10000)")
    pack.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN", help=column_help)
    pack.add_argument("--task", choices=ALL_TASKS, help="the task of every record, for a source without a task column")
    pack.set_defaults(handler=_data_pack)
    operator = commands.add_parser("operator", help="run the operator against the cluster of $KUBECONFIG (or in-cluster)")
    operator.add_argument("--namespace", action="append", help="watch only this namespace (repeatable); default: all")
    operator.add_argument("--liveness", default=None, help="serve kopf's liveness probe, e.g. http://0.0.0.0:8081/healthz")
    operator.add_argument("--peering", metavar="NAME", help="run as one of several replicas: only the oldest live one "
                          "acts (kopf peering through the ClusterKopfPeering NAME; its CRD must be installed)")
    operator.add_argument("--peering-lifetime", type=int, default=30, metavar="SECONDS",
                          help="a replica silent this long is taken for dead and the next one acts (default: 30)")
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
