"""`camgraph` command line: `camgraph mpta validate|inspect|pack`, `camgraph gpu-config`
and `camgraph bench`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from graph.gpu_config import GpuSettings, gpu_variant
from graph.pipeline.archive import (
    ArchiveError,
    ArchiveLimits,
    inspect_archive,
    load_archive,
    pack_archive,
)
from graph.pipeline.spec import Node


def _tree(node: Node, depth: int = 0) -> list[str]:
    pad = "  " * depth
    kind = node.modelType or ("detector" if depth == 0 else "classifier")
    model = node.modelFile or node.engine or "-"
    lines = [
        f"{pad}{node.modelId} [{kind}] {model} triggers={node.triggerClasses} "
        f"min_conf={node.minConfidence}{' parallel' if node.parallel else ''}"
    ]
    for action in [*node.actions, *node.parallelActions]:
        lines.append(f"{pad}  action {action.type}")
    for branch in node.branches:
        lines += _tree(branch, depth + 1)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="camgraph", description=__doc__)
    commands = parser.add_subparsers(dest="group", required=True)
    mpta = commands.add_parser("mpta", help="pipeline archives").add_subparsers(
        dest="command", required=True
    )
    for name, text in (("validate", "check an archive"), ("inspect", "check and describe")):
        p = mpta.add_parser(name, help=text)
        p.add_argument("archive", help="path or http(s) URL of an .mpta")
        p.add_argument("--json", action="store_true", help="print the validated pipeline")
    pack = mpta.add_parser("pack", help="zip a pipeline.json and its model files")
    pack.add_argument("pipeline_json", type=Path)
    pack.add_argument("--out", type=Path, required=True)
    pack.add_argument("--models-dir", type=Path, default=None)
    gpu = commands.add_parser(
        "gpu-config", help="a GPU node's variant of a serve config, printed as YAML"
    )
    gpu.add_argument("config", type=Path, help="e.g. serve_config.yaml")
    for name, field in GpuSettings.model_fields.items():
        gpu.add_argument(  # strings: GpuSettings converts and checks them
            f"--{name.replace('_', '-')}",
            default=field.default,
            help=f"{field.description} (default: %(default)s)",
        )
    bench = commands.add_parser("bench", help="camgraph side by side with its baselines")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark (and what it imports) only when asked for
        from benchmarks import harness

        harness.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.group == "bench":
        return harness.run(args)
    if args.group == "gpu-config":
        return _gpu_config(args)

    limits = ArchiveLimits()
    try:
        if args.command == "pack":
            out = pack_archive(args.pipeline_json, args.out, args.models_dir)
            inspect_archive(out, limits)
            print(out)
            return 0
        if args.archive.startswith(("http://", "https://")):
            with tempfile.TemporaryDirectory() as cache:
                pipeline = load_archive(args.archive, Path(cache), limits).pipeline
        else:
            pipeline = inspect_archive(Path(args.archive), limits)
    except ArchiveError as exc:
        print(f"invalid archive {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    for warning in pipeline.connection_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(pipeline.model_dump(mode="json", exclude_none=True), indent=2))
    elif args.command == "inspect":
        print("\n".join(_tree(pipeline.pipeline)))
    else:
        print(f"ok: {args.archive}")
    return 0


def _gpu_config(args: argparse.Namespace) -> int:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    def fail(message: str) -> int:
        print(f"camgraph gpu-config: {message}", file=sys.stderr)
        return 2

    try:
        settings = GpuSettings.model_validate(
            {name: getattr(args, name) for name in GpuSettings.model_fields}
        )
        config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        return fail(str(exc))
    try:
        ServeDeploySchema.model_validate(config)  # what `serve deploy` would refuse
        variant, notes = gpu_variant(config, settings)
        ServeDeploySchema.model_validate(variant)
    except (ValueError, TypeError, AttributeError) as exc:  # Ray's own schema raises
        return fail(f"{args.config}: {exc}")  # AttributeError on some malformed input
    for note in notes:
        print(f"camgraph gpu-config: {note}", file=sys.stderr)
    print(f"# camgraph gpu-config of {args.config.name}: detectors on GPUs (README)")
    print(yaml.safe_dump(variant, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
