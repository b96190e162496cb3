"""Human comparisons: ``rlhf-jax label`` serves a local page where people rank K responses
per prompt (ties allowed), rate each 1-7 and tick the paper's metadata flags; each
submission lands in ``<workdir>/labels/<labeler>.jsonl`` in the comparisons format the RM
stage reads. A lead's view (``/admin``) shows progress, time and agreement.

Modules: :mod:`.storage` (items and label files on disk), :mod:`.assign` (who sees what,
in which order), :mod:`.access` (tokens, host checks, the server), :mod:`.guidelines` (the
instructions), :mod:`.server` (the WSGI app), :mod:`.stats` (agreement and progress),
:mod:`.command` (the CLI command); the pages are ``static/``.
"""

from rlhf_jax.labeling.access import make_server
from rlhf_jax.labeling.server import LabelApp
from rlhf_jax.labeling.stats import format_stats, label_stats
from rlhf_jax.labeling.storage import FLAGS, LabelStore, make_items, read_items, write_items

__all__ = ["FLAGS", "LabelApp", "LabelStore", "format_stats", "label_stats", "make_items", "make_server",
           "read_items", "write_items"]
