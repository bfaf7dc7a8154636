"""The `veilstream` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from veilstream.config import VeilstreamConfig, load_config, resolve_device
from veilstream.errors import VeilstreamError


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _stops(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("float", "published") for v in values):
        raise argparse.ArgumentTypeError(f"expected float and/or published, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veilstream", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML configuration (default: built-in defaults)")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="reproduce the paper's experiment on images and videos")
    evaluate.add_argument("paths", nargs="+", type=Path, help="image files, folders, videos")
    evaluate.add_argument("--report", type=Path, required=True, help="folder for summary.json, frames.jsonl, plots")
    evaluate.add_argument("--region", choices=["salient", "detect"], default="salient")
    evaluate.add_argument("--size", type=int, default=50, help="salient window side at classifier resolution")
    evaluate.add_argument("--alpha", type=_floats, help="step size(s), comma-separated, e.g. 0.025,0.05,0.1")
    evaluate.add_argument("--stop", type=_stops, help="float, published, or both: float,published")
    evaluate.add_argument("--video-step", type=int, default=10, help="use every Nth video frame")
    evaluate.add_argument("--paper-blur", action="store_true", help="the paper's 9x9 sigma 10 Gaussian blur")
    evaluate.add_argument(
        "--check-with",
        nargs="+",
        default=[],
        metavar="NAME",
        help="classifiers NOT corrected against, whose decisions on the published bytes are reported (a configured "
        "classifier's name, taken out of the correction, or a built-in: efficientnet-lite0/1/2)",
    )
    evaluate.add_argument("--no-progress", action="store_true")
    privacy = commands.add_parser("privacy", help="face and plate recall of the default pipeline on a labelled set")
    privacy.add_argument("labels", type=Path, help="labels file, e.g. datasets/privacy/labels.json")
    privacy.add_argument("--media", type=Path, help="folder of the labelled media (default: the sample media cache)")
    privacy.add_argument("--report", type=Path, required=True, help="folder for summary.json, privacy.png, sheets")
    privacy.add_argument("--threshold", type=float, default=None, help="anonymized below this share of detail kept")
    privacy.add_argument("--leak-check", choices=["off", "mtcnn"], default="off", help="independent face detector")
    privacy.add_argument("--no-progress", action="store_true")
    anonymize = commands.add_parser("anonymize", help="anonymize images, folders and videos into a folder")
    anonymize.add_argument("paths", nargs="+", type=Path, help="image files, folders, videos (mp4/avi)")
    anonymize.add_argument("--out", type=Path, required=True, help="folder for outputs, frames.jsonl, summary.json")
    anonymize.add_argument("--max-video-frames", type=int, help="stop each video after N frames")
    anonymize.add_argument("--no-progress", action="store_true")
    worker = commands.add_parser("worker", help="run the Kafka worker until SIGTERM/SIGINT")
    worker.add_argument("--bootstrap", help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]")
    worker.add_argument("--input-topic", action="append", help="input topic (repeatable)")
    worker.add_argument("--output-topic")
    worker.add_argument("--metrics-topic")
    worker.add_argument("--dlq-topic")
    worker.add_argument("--group", help="consumer group id")
    worker.add_argument("--http-port", type=int)
    worker.add_argument("--log-level", default="INFO")
    replay = commands.add_parser("replay", help="publish recorded frames (videos, folders, manifests) to a topic")
    replay.add_argument("sources", nargs="+", type=Path, help="videos, image folders, CSV/JSONL manifests")
    replay.add_argument("--topic", required=True)
    replay.add_argument("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap_servers)")
    replay.add_argument("--camera", action="append", help="camera id per source, in order (default: file stem)")
    replay.add_argument("--rate", default="recorded", help="'recorded' (timestamps / fps), 'max', or frames/s")
    replay.add_argument("--folder-fps", type=float, default=10.0, help="frame rate of image folders")
    replay.add_argument("--loop", action="store_true", help="start again at the end (until interrupted)")
    replay.add_argument("--start-at", type=int, help="skip the first N messages (resume)")
    replay.add_argument("--limit", type=int, help="stop after N messages")
    replay.add_argument("--state", type=Path, help="file keeping the position, to resume after an interruption")
    replay.add_argument("--no-progress", action="store_true")
    demo = commands.add_parser("demo", help="embedded broker + worker + replay of vtest.avi, results in --out")
    demo.add_argument("--out", type=Path, default=Path("out"))
    demo.add_argument("--video", type=Path, help="default: vtest.avi in the sample media cache")
    demo.add_argument("--frames", type=int, default=150, help="frames to replay")
    monitor = commands.add_parser("monitor", help="live dashboard of the metrics topic; --once --json for scripts")
    monitor.add_argument("--bootstrap", help="default: kafka.bootstrap_servers")
    monitor.add_argument("--metrics-topic", help="default: worker.metrics_topic")
    monitor.add_argument("--dlq-topic", help="default: worker.dlq_topic")
    monitor.add_argument("--no-dlq", action="store_true", help="do not read the dead-letter topic")
    monitor.add_argument("--window", type=float, default=300.0, help="seconds of history to fold in")
    monitor.add_argument("--from-beginning", action="store_true")
    monitor.add_argument("--once", action="store_true", help="read until caught up, print one snapshot, exit")
    monitor.add_argument("--json", action="store_true")
    monitor.add_argument("--group-lag", help="consumer group whose lag to show (e.g. worker.group_id)")
    monitor.add_argument("--max-final-changes", type=int, default=0)
    monitor.add_argument("--max-dead-letters", type=int)
    monitor.add_argument("--max-budget-exhausted", type=int)
    monitor.add_argument("--max-p95-latency-ms", type=float)
    monitor.add_argument("--max-lag", type=int)
    monitor.add_argument("--refresh", type=float, default=2.0)
    monitor.add_argument("--duration", type=float, help="stop the live view after S seconds")
    monitor.add_argument("--timeout", type=float, default=60.0)
    monitor.add_argument("--plain", action="store_true", help="plain text instead of the rich terminal view")

    report = commands.add_parser("report", help="HTML report with plots from metrics records")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="JSONL file of metrics records (e.g. the demo's metrics.jsonl)")
    source.add_argument("--topic", help="read this metrics topic")
    report.add_argument("--bootstrap", help="default: kafka.bootstrap_servers")
    report.add_argument("--since", help="ISO time, 'now', or a duration back such as 15m, 2h, 7d")
    report.add_argument("--until")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--title", default="veilstream metrics")

    check = commands.add_parser("check", help="exit 0 when the worker (or the models) are healthy, else 1")
    check.add_argument("--url", default="http://127.0.0.1:8080", help="the worker's HTTP address")
    check.add_argument("--models", action="store_true", help="load the models and run one frame instead")
    check.add_argument("--timeout", type=float, default=5.0)
    for command in commands.choices.values():
        # `veilstream worker --config FILE` reads as well as `veilstream --config FILE worker`.
        command.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="YAML configuration")
    return parser


def _monitor(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    from veilstream.monitoring import Thresholds, run_monitor

    thresholds = Thresholds(
        max_final_changes=args.max_final_changes,
        max_dead_letters=args.max_dead_letters,
        max_budget_exhausted=args.max_budget_exhausted,
        max_p95_latency_ms=args.max_p95_latency_ms,
        max_lag=args.max_lag,
    )
    try:
        return run_monitor(
            args.bootstrap or config.kafka.bootstrap_servers,
            args.metrics_topic or config.worker.metrics_topic,
            None if args.no_dlq else (args.dlq_topic or config.worker.dlq_topic),
            once=args.once,
            as_json=args.json,
            window_s=args.window,
            thresholds=thresholds,
            from_beginning=args.from_beginning,
            group_lag=args.group_lag,
            refresh_s=args.refresh,
            duration_s=args.duration,
            timeout_s=args.timeout,
            display="plain" if args.plain else "auto",
            client_options={k: v for k, v in config.kafka.client_options().items() if k != "bootstrap_servers"},
        )
    except ValueError as error:
        print(f"veilstream monitor: {error}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    from veilstream.monitoring.report import load_records, parse_time, write_report

    records = load_records(
        args.input,
        bootstrap=None if args.input else (args.bootstrap or config.kafka.bootstrap_servers),
        topic=args.topic,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        client_options=config.kafka.client_options(),  # TLS and SASL as for the monitor; the bootstrap above wins
    )
    page = write_report(records, args.out, args.title)
    print(f"report: {page}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from veilstream.worker.check import check_http, check_models

    if args.models:
        return check_models(args.config)
    return check_http(args.url, args.timeout)


def _demo(args: argparse.Namespace) -> int:
    import os

    from veilstream.commands.demo import format_summary, run_demo

    media = Path(os.environ.get("VEILSTREAM_MEDIA", Path.home() / ".cache" / "veilstream" / "media"))
    video = args.video or media / "vtest.avi"
    if not video.is_file():
        print(f"veilstream: {video} not found (run `make media`)", file=sys.stderr)
        return 2
    try:
        summary = run_demo(video, args.out, args.frames)
    except KeyboardInterrupt:
        print("interrupted: broker and worker stopped", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"outputs in {args.out}/: anonymized.mp4, contact_sheet.png, metrics.png, summary.json, metrics.jsonl")
    return 0 if summary["outputs_received"] > 0 else 1


def _replay(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    from veilstream.commands.replay_cli import run_replay

    return run_replay(args, config)


def with_worker_overrides(config: VeilstreamConfig, args: argparse.Namespace) -> VeilstreamConfig:
    """Command-line flags win over the file and the environment; the result is validated again."""
    kafka = {"bootstrap_servers": args.bootstrap} if args.bootstrap else {}
    flags = {
        "input_topics": tuple(args.input_topic) if args.input_topic else None,
        "output_topic": args.output_topic,
        "metrics_topic": args.metrics_topic,
        "dlq_topic": args.dlq_topic,
        "group_id": args.group,
        "http_port": args.http_port,
    }
    worker = {k: v for k, v in flags.items() if v is not None}
    data = config.model_dump()
    data["kafka"] |= kafka
    data["worker"] |= worker
    return VeilstreamConfig.model_validate(data)


def _worker(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    from veilstream.factory import build_pipeline
    from veilstream.worker.logs import configure_logging
    from veilstream.worker.service import run_worker

    configure_logging(args.log_level)
    return run_worker(with_worker_overrides(config, args), build_pipeline)


def _anonymize(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    from veilstream.commands.anonymize import run_anonymize
    from veilstream.factory import build_pipeline

    summary = run_anonymize(
        args.paths, build_pipeline(config), config, args.out, args.max_video_frames, progress=not args.no_progress
    )
    print(
        f"{'input':<28} {'frames':>6} {'faces':>6} {'plates':>6} {'residual':>8} {'naive chg':>9} {'final chg':>9} "
        f"{'budget':>6} {'fps':>6}"
    )
    for row in summary["inputs"]:
        name = Path(row["source"]).name[:28]
        fps = row["frames_per_second"] or 0.0
        print(
            f"{name:<28} {row['frames']:>6} {row['faces']:>6} {row['plates']:>6} {row['residual_detections']:>8} "
            f"{row['naive_changed']:>9} {row['final_changed']:>9} {row['budget_exhausted']:>6} {fps:>6.2f}"
        )
    for error in summary["errors"]:
        print(f"error: {error['input']}: {error['reason']}: {error['detail']}", file=sys.stderr)
    print(f"outputs and summary.json in {args.out}")
    totals = summary["totals"]
    return 0 if totals["published"] + totals["masked"] > 0 else 1


def _eval(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    from veilstream.commands.eval_transfer import split_check_with
    from veilstream.commands.evaluate import EvalSetting, format_models, format_table, run_eval
    from veilstream.correction.loading import build_ensemble
    from veilstream.factory import build_pipeline

    checkers = None
    if args.check_with:
        config, checked = split_check_with(config, args.check_with)
        checkers = build_ensemble(tuple(checked), resolve_device(config.device))
    pipeline = build_pipeline(config, args.region, args.size, args.paper_blur, need_classifiers=True)
    assert pipeline.corrector is not None  # need_classifiers
    base = pipeline.corrector.settings
    # dict.fromkeys: a setting named twice runs once (the report keys settings by name).
    settings = list(
        dict.fromkeys(
            EvalSetting(alpha, stop) for stop in (args.stop or [base.stop]) for alpha in (args.alpha or [base.alpha])
        )
    )
    parameters = {
        "region": args.region,
        "size": args.size,
        "anonymizer": "gaussian 9x9 sigma 10" if args.paper_blur else config.anonymizer.model_dump(),
        "classifiers": [c.name for c in config.classifiers],
        "checked_with": [m.name for m in checkers.members] if checkers else [],
        "max_iterations": base.max_iterations,
        "time_budget_ms": base.time_budget_ms,
        "max_change": base.max_change,
        "codec": pipeline.encoder.codec,
        "quality": pipeline.encoder.quality,
        "video_step": args.video_step,
        "device": str(pipeline.device),
    }
    summary = run_eval(
        args.paths, pipeline, config, settings, args.report, args.video_step, parameters, not args.no_progress, checkers
    )
    print(format_table(summary["sweep"]))
    if "models" in summary:
        print(format_models(summary["models"]))
    for error in summary["errors"]:
        print(f"error: {error['input']}: {error['reason']}: {error['detail']}", file=sys.stderr)
    print(f"report: {args.report / 'summary.json'}")
    return 0 if summary["corrected"] > 0 else 1


def _privacy(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    import os

    from veilstream.commands.privacy import format_table, run_privacy
    from veilstream.evaluation.labels import load_labels, media_problems
    from veilstream.evaluation.measures import ANONYMIZED_BELOW
    from veilstream.factory import build_pipeline

    media = args.media or Path(os.environ.get("VEILSTREAM_MEDIA", Path.home() / ".cache" / "veilstream" / "media"))
    try:
        labels = load_labels(args.labels)
    except (OSError, ValueError) as error:
        print(f"veilstream privacy: {args.labels}: {error}", file=sys.stderr)
        return 2
    problems = media_problems(labels, media)
    for problem in problems:
        print(f"veilstream privacy: {problem} (run `make media`)", file=sys.stderr)
    if problems:
        return 2
    leak_detector = None
    if args.leak_check == "mtcnn":
        from veilstream.detectors.mtcnn import MtcnnFaces
        from veilstream.errors import ModelLoadError

        try:
            leak_detector = MtcnnFaces()
        except ModelLoadError as error:
            print(f"veilstream privacy: {error}", file=sys.stderr)
            return 2
    pipeline = build_pipeline(config)
    parameters = {
        "labels": str(args.labels),
        "media": str(media),
        "detectors": config.detectors.model_dump(),
        "anonymizer": config.anonymizer.model_dump(),
        "correction": config.correction.enabled,
        "codec": pipeline.encoder.codec,
        "quality": pipeline.encoder.quality,
        "device": str(pipeline.device),
    }
    threshold = ANONYMIZED_BELOW if args.threshold is None else args.threshold
    summary = run_privacy(
        labels,
        media,
        pipeline,
        args.report,
        config.pipeline.batch_size,
        config.anonymizer.shape,
        threshold,
        leak_detector,
        parameters,
        not args.no_progress,
    )
    print(format_table(summary))
    print(f"report: {args.report / 'summary.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args)  # the HTTP probe needs no configuration; --models loads it itself
        config = load_config(args.config)
        if args.command == "eval":
            return _eval(args, config)
        if args.command == "privacy":
            return _privacy(args, config)
        if args.command == "anonymize":
            return _anonymize(args, config)
        if args.command == "worker":
            return _worker(args, config)
        if args.command == "replay":
            return _replay(args, config)
        if args.command == "demo":
            return _demo(args)
        if args.command == "monitor":
            return _monitor(args, config)
        if args.command == "report":
            return _report(args, config)
    except VeilstreamError as error:
        print(f"veilstream: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"error": f"unknown command {args.command}"}), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
