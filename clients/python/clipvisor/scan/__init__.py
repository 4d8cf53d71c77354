"""``clipvisor scan``: a fault-tolerant pre-flight over every clip of a dataset (docs/scan.md).

Run it as ``clipvisor-scan DIR_OR_MANIFEST --out OUT`` or ``python -m clipvisor.scan``. The
pieces are usable on their own: :func:`~clipvisor.scan.inputs.read_samples` (datasets),
:func:`~clipvisor.scan.facts.probe_clip` / :func:`~clipvisor.scan.facts.verify_clip` (one clip),
:class:`~clipvisor.scan.qwenplan.QwenPlanner`, :class:`~clipvisor.scan.buckets.BucketConfig`.
"""

from .cli import main

__all__ = ["main"]
