"""Deterministic image-level splits of a COCO json (held-out evaluation, tuning splits).

An image's rank is the sha256 of ``f"{salt}:{image_id}"``; the ``n_holdout`` lowest-ranked
images are held out. The rule depends only on the ids and the salt (not on file order), so
the same json always splits the same way, and a different salt gives an independent split
(e.g. a tuning split of the training part that never touches the held-out images).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

HOLDOUT_SALT = "holdout"  # the held-out evaluation split
TUNE_SALT = "tune"  # a validation split inside the training part, for choosing settings


def holdout_ids(image_ids: Iterable, n_holdout: int, salt: str = HOLDOUT_SALT) -> set:
    """The ``n_holdout`` image ids with the lowest sha256(salt:id) rank."""
    ids = list(image_ids)
    if not 0 <= n_holdout <= len(ids):
        raise ValueError(f"cannot hold out {n_holdout} of {len(ids)} images")
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"{salt}:{i}".encode()).hexdigest())
    return set(rank[:n_holdout])


def split_coco(coco: dict, n_holdout: int, salt: str = HOLDOUT_SALT) -> tuple[dict, dict]:
    """(kept, held_out) COCO dicts: images and their annotations; everything else copied."""
    images = [im for im in coco.get("images", []) if isinstance(im, dict)]
    held = holdout_ids({str(im.get("id")): im.get("id") for im in images}.values(), n_holdout, salt)
    base = {k: v for k, v in coco.items() if k not in ("images", "annotations")}

    def part(keep_held: bool) -> dict:
        return {
            **base,
            "images": [im for im in images if (im.get("id") in held) == keep_held],
            "annotations": [
                a
                for a in coco.get("annotations", [])
                if isinstance(a, dict) and (a.get("image_id") in held) == keep_held
            ],
        }

    return part(False), part(True)
