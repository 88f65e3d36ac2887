"""Files and memory: atomic folders (``files.py``), offline model assets (``assets.py``), tensor-by-tensor safetensors
access (``safetensors_stream.py``), layer-streaming conversion of checkpoints too large to load (the ``streaming``
package), the approximate LoRA export of a FuRA adapter (``export.py``), process-memory measurements (``memory.py``)
and settings copied by field name (``fields.py``)."""
