"""`eval --check-with`: the transfer report. Classifiers that are NOT corrected against decide on the original and
on the published bytes; per model, how many decisions the naive blur and the corrected output changed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from veilstream.config import BUILTIN_CLASSIFIERS, ClassifierConfig, VeilstreamConfig
from veilstream.correction.classifier import Ensemble
from veilstream.decoding.images import Frame, decode_frame
from veilstream.errors import ConfigError
from veilstream.outcome import Published
from veilstream.runner import Processed
from veilstream.schemas.records import FrameRecord

NAIVE = "naive"  # the setting without correction: the anonymized frame, encoded as published


def split_check_with(config: VeilstreamConfig, names: Sequence[str]) -> tuple[VeilstreamConfig, list[ClassifierConfig]]:
    """The config to correct against (its classifiers less those named) and the classifiers to check with: a
    configured classifier's name, or a built-in source, built with the config's `classifier_defaults` and
    deciding like the first configured classifier (its grouping, when that one has ImageNet labels)."""
    configured = {c.name: c for c in config.classifiers}
    first = config.classifiers[0]
    like_first = {"grouping": first.grouping} if first.labels == "imagenet" else {}
    checkers = []
    for name in dict.fromkeys(names):
        if name in configured:
            checkers.append(configured[name])
        elif name in BUILTIN_CLASSIFIERS:
            spec = {**like_first, **config.classifier_defaults, "source": name}
            checkers.append(ClassifierConfig.model_validate(spec))
        else:
            known = ", ".join(sorted({*configured, *BUILTIN_CLASSIFIERS}))
            raise ConfigError(f"--check-with {name!r}: neither a configured classifier nor a built-in ({known})")
    checked = {c.name for c in checkers}
    kept = tuple(c for c in config.classifiers if c.name not in checked)
    if not kept:
        raise ConfigError("--check-with names every configured classifier: at least one must be corrected against")
    return config.model_copy(update={"classifiers": kept}), checkers


class TransferSink:
    """Counts, per checked classifier and per setting, the published frames whose decision on the published bytes
    differs from its decision on the original (masked and dropped frames are not counted)."""

    def __init__(self, checkers: Ensemble, settings: Sequence[str]) -> None:
        self.checkers = checkers
        self.frames = dict.fromkeys(settings, 0)
        self.changed = {s: dict.fromkeys((m.name for m in checkers.members), 0) for s in settings}
        self.pending: list[tuple[str, Frame, bytes]] = []

    def add(self, item: Processed) -> None:
        setting = item.record.setting
        if isinstance(item.outcome, Published) and item.frame is not None and setting in self.frames:
            self.pending.append((str(setting), item.frame, item.outcome.data))

    def flush(self) -> None:
        if not self.pending:
            return
        # Every setting of a frame shares its original: decide on each original once.
        originals = {id(frame): frame for _, frame, _ in self.pending}
        reference = dict(zip(originals, self._decide(list(originals.values())).T, strict=True))
        published = self._decide([decode_frame(data) for _, _, data in self.pending])
        for k, (setting, frame, _) in enumerate(self.pending):
            self.frames[setting] += 1
            for m, member in enumerate(self.checkers.members):
                self.changed[setting][member.name] += int(reference[id(frame)][m] != published[m, k])
        self.pending.clear()

    def _decide(self, frames: Sequence[Frame]) -> torch.Tensor:
        device = self.checkers.members[0].device
        tensors = [torch.from_numpy(np.ascontiguousarray(f)).to(device).permute(2, 0, 1) for f in frames]
        return self.checkers.decide(tensors)[0].cpu()


def model_rows(records: Sequence[FrameRecord], transfer: TransferSink, setting: str) -> list[dict[str, Any]]:
    """One row per classifier: corrected against (from the frame records) or only checked (from the sink)."""
    counts: dict[str, dict[str, int]] = {}
    published = [r for r in records if r.outcome == "published"]
    for record in published:
        for original, naive, final in zip(record.original, record.naive, record.final, strict=False):
            row = counts.setdefault(original.classifier, {"naive_changed": 0, "final_changed": 0})
            row["naive_changed"] += int(naive.index != original.index)
            row["final_changed"] += int(final.index != original.index)
    rows = [{"classifier": name, "corrected": True, "frames": len(published), **row} for name, row in counts.items()]
    rows += [
        {
            "classifier": name,
            "corrected": False,
            "frames": transfer.frames[setting],
            "naive_changed": transfer.changed[NAIVE][name],
            "final_changed": transfer.changed[setting][name],
        }
        for name in transfer.changed[setting]
    ]
    return rows


def format_models(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-model table: corrected-against members and checked classifiers, naive vs final changes."""
    lines = [f"{'classifier':>24} {'corrected':>9} {'frames':>7} {'naive chg':>9} {'final chg':>9}"]
    for row in rows:
        corrected = "yes" if row["corrected"] else "no"
        lines.append(
            f"{row['classifier']:>24} {corrected:>9} {row['frames']:>7} {row['naive_changed']:>9}"
            f" {row['final_changed']:>9}"
        )
    return "\n".join(lines)


class OnlySettings:
    """Passes on only the records of the named settings (the report sink knows the sweep's settings only)."""

    def __init__(self, sink: Any, settings: set[str]) -> None:
        self.sink = sink
        self.settings = settings

    def add(self, item: Processed) -> None:
        if item.record.setting in self.settings:
            self.sink.add(item)

    def flush(self) -> None:
        self.sink.flush()
