"""An independent leak check: a face detector of another family (MTCNN) looks at the whole published frame.

Every face it finds where we blurred nothing is a possible leak. Against the labels it is one of: a labelled face
we left visible (a confirmed leak), a difficult head, or unlabelled (its false alarm, or a face the labels lack:
look at leak_check.png). facenet-pytorch ships MTCNN's weights in its wheel; install it with `--no-deps`.
"""

from __future__ import annotations

from collections.abc import Sequence

from veilstream.detectors.base import Detection
from veilstream.detectors.mtcnn import MtcnnFaces
from veilstream.evaluation.labels import Box, LabelledFrame
from veilstream.evaluation.measures import Mask, coverage, is_on

__all__ = ["BLURRED", "MtcnnFaces", "leak_findings"]

# Where our blur covers at least this share of the found box, the face was anonymized (found again inside it).
BLURRED = 0.5


def leak_findings(found: Sequence[Detection], blurred: Mask, labelled: LabelledFrame) -> list[dict[str, object]]:
    """Each face found on the published frame outside our blurred regions, with what the labels say it is:
    'labelled' (a labelled face), 'difficult', 'ignored' or 'unlabelled'."""
    faces = [o for o in labelled.objects if o.kind == "face"]
    findings: list[dict[str, object]] = []
    for face in found:
        box: Box = (face.x1, face.y1, face.x2, face.y2)
        if coverage(box, blurred) >= BLURRED:
            continue
        match = next((o for o in faces if is_on(o.box, box)), None)
        if match is not None:
            status = "difficult" if match.difficult else "labelled"
        elif any(is_on(area, box) for area in labelled.ignore):
            status = "ignored"
        else:
            status = "unlabelled"
        findings.append({"box": [round(v, 1) for v in box], "score": round(face.score, 3), "status": status})
    return findings
