"""Batch embedding with Apache Beam RunInference (``dolg embed-batch``; needs the ``[beam]`` extra).

:func:`embed_batch` runs an export's ``serving_default`` signature over folders,
globs, ``id,path`` CSVs or TFRecords on any Beam runner (in-process by default)
and writes ``embeddings-*.parquet`` (``id`` string, ``embedding`` list<float32>;
model name, version and SavedModel fingerprint in the file metadata), the
images it could not embed to ``errors-*.jsonl`` and a summary to
``dolg_embed_batch.json``.
"""

from dolg_tf.pipelines.embed import DEFAULT_RUNNER, build_pipeline, embed_batch
from dolg_tf.pipelines.model import ExportInfo, SavedModelHandler, describe_export

__all__ = ["DEFAULT_RUNNER", "ExportInfo", "SavedModelHandler", "build_pipeline", "describe_export", "embed_batch"]
