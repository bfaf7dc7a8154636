"""`veilstream anonymize`: images, folders and videos through the shared pipeline, written to a folder.

Files -> the runner -> a folder sink (anonymized images, frames.jsonl, summary.json) and a video sink (one
.mp4 per video input, its size and frame rate kept). Every path given or found in a folder ends up in
summary.json: read (a row, with its failed frames in `errors`) or passed over (`skipped`, with the reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from veilstream.config import VeilstreamConfig
from veilstream.decoding.files import file_items, scan_inputs
from veilstream.decoding.images import DecodeLimits
from veilstream.pipeline import Pipeline
from veilstream.publishing.files import FolderSink, VideoSink
from veilstream.runner import Runner


def run_anonymize(
    inputs: Sequence[Path],
    pipeline: Pipeline,
    config: VeilstreamConfig,
    out: Path,
    video_limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Anonymize every input into `out`; returns summary.json's content."""
    scan = scan_inputs(inputs)
    videos = VideoSink(out)
    folder = FolderSink(out, pipeline.encoder.extension, videos, scan.skipped)
    runner = Runner(
        pipeline, [folder, videos], config.pipeline.batch_size, worker="anonymize", overlap=config.pipeline.overlap
    )
    limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
    items = file_items(scan, video_step=1, limits=limits, video_limit=video_limit)
    try:
        runner.run(tqdm(items, unit="frame", disable=not progress))
    finally:
        videos.close()  # a video is playable only once its writer is released, also after a failure
    return folder.close()
