"""The NSFW policy's torch-free half: which detections flag an image.

The detector (`pipeline.safety.detector`, NudeNet) runs in a worker or the bot's
photo helper and returns ``{label: score}``; the bot decides here. An image is
flagged when any *explicit* label scores at or above `[safety] threshold`, or any
label listed in `[safety.labels]` scores at or above its own threshold there (any
NudeNet label may be listed, e.g. ``FACE_FEMALE`` to test the policy on portraits).
"""

from __future__ import annotations

from collections.abc import Mapping

# NudeNet 3.x labels that are sexually explicit by default.
EXPLICIT_LABELS = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
# Every label NudeNet 3.x reports (for checking `[safety.labels]` keys).
NUDENET_LABELS = frozenset(
    {
        "FEMALE_GENITALIA_COVERED",
        "FACE_FEMALE",
        "BUTTOCKS_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_BREAST_EXPOSED",
        "ANUS_EXPOSED",
        "FEET_EXPOSED",
        "BELLY_COVERED",
        "FEET_COVERED",
        "ARMPITS_COVERED",
        "ARMPITS_EXPOSED",
        "FACE_MALE",
        "BELLY_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "ANUS_COVERED",
        "FEMALE_BREAST_COVERED",
        "BUTTOCKS_COVERED",
    }
)
POLICIES = ("block", "spoiler", "allow")


def thresholds(threshold: float, labels: Mapping[str, float]) -> dict[str, float]:
    """Label → the score at which it flags an image."""
    table = {label: threshold for label in EXPLICIT_LABELS}
    table.update(labels)
    return table


def flagged_labels(
    scores: Mapping[str, float], threshold: float, labels: Mapping[str, float]
) -> list[str]:
    """The labels of ``scores`` that flag the image (empty: not flagged)."""
    table = thresholds(threshold, labels)
    return sorted(
        label for label, score in scores.items() if label in table and score >= table[label]
    )
