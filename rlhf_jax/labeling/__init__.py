"""Human comparisons: ``rlhf-jax label`` serves a local page where people rank K responses
per prompt (ties allowed) and tick the paper's metadata flags; each submission lands in
``<workdir>/labels/<labeler>.jsonl`` in the comparisons format the RM stage reads.

Modules: :mod:`.storage` (items and label files on disk), :mod:`.server` (the WSGI app),
:mod:`.stats` (agreement), :mod:`.command` (the CLI command); the page is ``static/``.
"""

from rlhf_jax.labeling.server import LabelApp, make_server
from rlhf_jax.labeling.stats import format_stats, label_stats
from rlhf_jax.labeling.storage import FLAGS, LabelStore, make_items, read_items, write_items

__all__ = ["FLAGS", "LabelApp", "LabelStore", "format_stats", "label_stats", "make_items", "make_server",
           "read_items", "write_items"]
