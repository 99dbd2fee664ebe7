"""The built-in demo: photos that ship inside installed packages, and ``dolg demo`` end to end.

* :mod:`dolg_tf.demo.photos`: the photos, their synthetic views, the held-out
  retrieval split and its metrics (numpy only);
* :mod:`dolg_tf.demo.source`: the photos as a training source, what
  ``dolg_tf.data.open_source(None)`` opens;
* :mod:`dolg_tf.demo.run`: ``dolg demo`` (train, export, serve, embed, index,
  search, score, draw), what ``make demo`` runs.
"""

from dolg_tf._lazy import lazy_exports

# Public name -> submodule, resolved on first use: the photos need neither TensorFlow nor a server.
_EXPORTS = {
    "demo_photos": ".photos",
    "synthetic_view": ".photos",
    "demo_views": ".photos",
    "RetrievalSplit": ".photos",
    "demo_retrieval_split": ".photos",
    "retrieval_metrics": ".photos",
    "DemoSource": ".source",
    "DemoResult": ".run",
    "run_demo": ".run",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = list(_EXPORTS)
